"""Checkpoint files written whole or not at all, also when the disk fills."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from transfer_lightning.files import write_torch_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each local file beside its final name and renaming it (with
    :func:`~transfer_lightning.files.atomic_path`).

    Lightning's own writer saves local files through an fsspec transaction, which writes into the system's
    temporary folder and then copies: when the disk fills during that copy, half a ``last.ckpt`` stays under
    its final name. Paths with a scheme (``s3://``) are left to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        # Not fsynced, as Lightning's own writer: checkpoints are written every epoch, and syncing each took seconds
        # on slow disks (the test suite went from 7 to 12 minutes). The rename alone keeps half files away.
        write_torch_file(checkpoint, Path(path), durable=False)
