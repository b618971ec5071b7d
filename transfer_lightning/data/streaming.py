"""Optimized data sets on LitData: what one holds (its ``transfer_lightning.json``), and its splits as streams.

``optimize`` (:mod:`~transfer_lightning.data.optimizing`) writes ``DIR/train``, ``DIR/val`` and (when the data
has one) ``DIR/test``, each a LitData data set of ``{"image", "label"}`` items, locally or to object storage
(``s3://``, ``gs://``, ``r2://``), and ``DIR/transfer_lightning.json`` last: a folder without it is not an
optimized data set (an interrupted ``optimize`` leaves none). Training reads each split through LitData's
``StreamingDataset``, which shards chunks across nodes, ranks and workers, caches downloaded chunks up to a
size limit, and resumes mid-epoch; images arrive as uint8 (3, H, W) and are prepared on the device as today.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.io import decode_jpeg

from transfer_lightning.data.datasets import count_balancing_weights, count_positive_weights
from transfer_lightning.data.preparation import Preparation
from transfer_lightning.data.source import Source
from transfer_lightning.data.storage import download_file, is_remote, require_litdata
from transfer_lightning.data.transforms import Decoding, Interpolation, View, stored_size
from transfer_lightning.errors import UserInputError
from transfer_lightning.tasks import TaskName

#: The file that makes a folder an optimized data set, written last.
INFO_FILE = "transfer_lightning.json"
#: The layout of the items and of :data:`INFO_FILE`; a reader refuses other versions.
FORMAT_VERSION = 1


@dataclass
class StreamInfo:
    """What an optimized data set holds: written by ``optimize``, checked by every reader."""

    task: TaskName
    class_names: list[str]
    #: (H, W) of the stored images, and how batches become the network's input (as the local store's).
    size: tuple[int, int]
    view: View
    #: The network's input size the data set was made for (null: the images' own size).
    image_size: int | None
    crop_pct: float
    #: jpeg (with ``quality``) or raw (uint8 pixels).
    encoding: str
    quality: int | None
    #: Images per split; a data set without test rows has no ``test`` entry (val then tests, as today).
    split_sizes: dict[str, int]
    #: Training images per class (multi-label: images that have the class).
    train_class_counts: list[int]
    #: Where each split came from, as the log says it.
    description: str
    source: str
    #: How stored images were resized (data sets optimized before it was recorded: bilinear).
    interpolation: Interpolation = "bilinear"
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decoding(self) -> Decoding:
        """How ``optimize`` decodes each image (as the local store does)."""
        return tuple(self.size), self.interpolation, self.image_size if self.view == "crop" else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> StreamInfo:
        values = json.loads(text)
        if values.get("format") != FORMAT_VERSION:
            raise UserInputError(
                f"{where} was optimized in format {values.get('format')}, this version reads {FORMAT_VERSION}: "
                "optimize the data set again."
            )
        values["size"] = tuple(values["size"])
        return cls(**values)


def read_info(root: str, storage_options: dict[str, Any] | None) -> StreamInfo:
    """The :class:`StreamInfo` of the optimized data set at ``root`` (a folder or an object-store URL), or one
    line saying why it cannot be read: missing, not optimized, unreachable, no credentials."""
    if not is_remote(root):
        path = Path(root).expanduser() / INFO_FILE
        if not path.is_file():
            what = "does not exist" if not path.parent.exists() else f"holds no {INFO_FILE}"
            raise UserInputError(
                f"data.streaming_dir {root} {what}: it must be a folder written by the optimize subcommand "
                "(python -m transfer_lightning optimize --data.data_dir PHOTOS --output DIR)."
            )
        return StreamInfo.from_json(path.read_text(), root)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / INFO_FILE
        download_file(f"{root.rstrip('/')}/{INFO_FILE}", local, storage_options)
        return StreamInfo.from_json(local.read_text(), root)


def decode_item(item: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """A stored item -> (uint8 (3, H, W) image, label): what the local store's datasets give, so batches
    are prepared on the device the same way. JPEG bytes are decoded by torchvision (libjpeg-turbo)."""
    image = item["image"]
    if isinstance(image, bytes | bytearray | memoryview):
        pixels = decode_jpeg(torch.frombuffer(bytearray(image), dtype=torch.uint8))
    else:
        pixels = torch.from_numpy(np.ascontiguousarray(image))
    return pixels, torch.as_tensor(np.asarray(item["label"]), dtype=torch.int64)


def split_dir(root: str, split: str) -> str:
    return f"{root.rstrip('/')}/{split}"


def chunk_cache_dir(cache_dir: Path, root: str, split: str) -> str:
    """Where downloaded chunks of a remote split are kept: one folder per data set and split under ``cache_dir``."""
    key = hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:16]
    return str(cache_dir / "streams" / f"{key}-{split}")


def open_split(
    root: str,
    split: str,
    training: bool,
    seed: int,
    max_cache_size: str,
    storage_options: dict[str, Any] | None,
    cache_dir: Path,
) -> Any:
    """A LitData ``StreamingDataset`` of one split. Training shuffles (chunks, then items within the chunks a
    worker holds) with ``seed`` (the same on every rank) and drops the last uneven items under DDP, as LitData
    does; evaluation neither shuffles nor drops, so every image is read exactly once across ranks."""
    litdata = require_litdata()
    return litdata.StreamingDataset(
        split_dir(root, split),
        cache_dir=chunk_cache_dir(cache_dir, root, split) if is_remote(root) else None,
        shuffle=training,
        drop_last=None if training else False,
        seed=seed,
        max_cache_size=max_cache_size,
        storage_options=storage_options or {},
        transform=decode_item,
    )


def stream_loader(dataset: Any, batch_size: int, num_workers: int, pin_memory: bool, trainer: Any = None) -> Any:
    """LitData's ``StreamingDataLoader``, whose state (the items served so far this epoch) goes into checkpoints and
    is restored by ``fit --ckpt_path``; with the training ``trainer``, that state counts trained batches only."""
    require_litdata()
    return _trained_batches_loader()(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, trainer=trainer
    )


@functools.cache
def _trained_batches_loader() -> type:
    from litdata import StreamingDataLoader

    class TrainedBatchesLoader(StreamingDataLoader):
        """A ``StreamingDataLoader`` whose saved state counts the batches the model has trained on.

        Lightning saves a loader's state with the checkpoint, but batches are taken before their step (the
        fetcher looks one ahead to know the last) and LitData counts every batch served: after Ctrl+C before
        step 3 the state said 4 batches, and the resumed epoch skipped one (tests/data/test_streaming.py).
        Here the state is recomputed for the batches whose step finished (Lightning's ``processed`` count, which
        it also resumes the epoch's batch index from). Batches are served round-robin by the workers, so the
        worker that served the last trained batch is ``(batches - 1) % workers``.
        """

        def __init__(self, *args: Any, trainer: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.trainer = trainer
            #: Whether the next epoch is the one a loaded state resumes.
            self._resuming = False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._resuming = self.restore

        def __iter__(self) -> Any:
            # LitData clears its "resuming" flag only when an epoch's iterator runs out, and Lightning ends an epoch
            # at its length without asking for more: the epoch after a resumed one then did not advance LitData's
            # epoch and replayed the resumed epoch's order. Only the first epoch after load_state_dict resumes.
            self.restore, self._resuming = self._resuming, False
            return super().__iter__()

        def state_dict(self) -> dict[str, Any]:
            state = super().state_dict()
            if (
                self.trainer is None
                or not self.trainer.training
                or not isinstance(state.get("num_samples_yielded"), int)
            ):
                return state
            trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            samples = min(trained * self.batch_size, state["num_samples_yielded"])
            if samples < state["num_samples_yielded"]:
                state["dataset"] = self.dataset.state_dict(samples, self.num_workers, self.batch_size)
                state["num_samples_yielded"] = samples
                state["latest_worker_idx"] = (trained - 1) % max(self.num_workers, 1)
            return state

    return TrainedBatchesLoader


class StreamSource(Source):
    """An optimized data set as the data module's source: its :class:`StreamInfo` read at once (class names and
    task are needed before training starts), its splits (made once, by ``optimize``) opened in ``setup``, where each
    rank knows its rank.

    Args:
        root: The data set's folder or object-store URL (``data.streaming_dir``).
        storage_options: The object store client's options (``endpoint_url``, credentials).
        max_cache_size: Most disk the downloaded chunks of one split take (LitData's limit, e.g. "50GB").
        cache_dir: Where downloaded chunks are kept (``streams/`` under the data module's cache_dir).
        given: ``data.class_names``; when set, they must be the data set's.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict[str, Any] | None,
        max_cache_size: str,
        cache_dir: Path,
        given: list[str] | None = None,
    ) -> None:
        require_litdata()
        self.root = root if is_remote(root) else str(Path(root).expanduser())
        self.storage_options, self.max_cache_size, self.cache_dir = storage_options, max_cache_size, cache_dir
        self.info = read_info(self.root, storage_options)
        if given is not None and list(given) != self.info.class_names:
            raise UserInputError(
                f"data.class_names {list(given)} differ from those of {self.root}: {self.info.class_names}. "
                "Leave data.class_names unset to use the data set's."
            )
        self.class_names = list(self.info.class_names)

    @property
    def task(self) -> TaskName:
        return self.info.task

    def check_size(self, image_size: int | None, crop_pct: float) -> None:
        """One line when the run's image size needs other stored images than the data set holds (the local
        store would have made a new store; a stream has to be optimized again)."""
        needed = stored_size(image_size, crop_pct) if image_size is not None else None
        if self.info.view == "resize":
            fits = needed is None or max(self.info.size) <= needed
        else:
            fits = needed is not None and tuple(self.info.size) == (needed, needed)
        if not fits:
            wanted = "the images' own size" if needed is None else f"{needed}x{needed} (image_size {image_size})"
            raise UserInputError(
                f"{self.root} holds {self.info.size[0]}x{self.info.size[1]} images made for image_size "
                f"{self.info.image_size} (crop_pct {self.info.crop_pct:.3f}), but this run needs {wanted}: set "
                f"--data.image_size {self.info.image_size}, or optimize the data again with --data.image_size "
                f"{image_size} --crop_pct {crop_pct:.4g}."
            )

    def stored_size(self, image_size: int | None, crop_pct: float) -> tuple[tuple[int, int], View]:
        self.check_size(image_size, crop_pct)
        return tuple(self.info.size), self.info.view

    def stored_interpolation(self, wanted: Interpolation) -> Interpolation:
        return self.info.interpolation

    def prepare(self, decoding: Decoding, val_size: int | float) -> None:
        """Nothing: LitData downloads chunks as they are read, and ``optimize`` made the splits."""

    def loss_weights(self, train_set: Any = None) -> Tensor:
        """The class weights of ``class_balance`` loss, from the training images per class counted at optimize time."""
        counts, total = torch.tensor(self.info.train_class_counts), self.info.split_sizes["train"]
        if self.info.task == "multilabel":
            return count_positive_weights(counts, total)
        return count_balancing_weights(counts, total)

    def splits(self, seed: int, preparation: Preparation) -> tuple[Any, Any, Any]:
        """(train, val, test) streams, once the run's image size is checked against the data set's; val also
        tests where the data set has no test split, and test validates where it has no val split (``val_size`` 0
        at optimize time), as with local data."""
        self.check_size(preparation.image_size, preparation.crop_pct)
        names = self.info.split_sizes
        val = "val" if "val" in names else "test"
        test = "test" if "test" in names else "val"
        return tuple(
            open_split(
                self.root, split, role == "train", seed,
                self.max_cache_size, self.storage_options, self.cache_dir,
            )
            for role, split in (("train", "train"), ("val", val), ("test", test))
        )  # fmt: skip

    def share(self, split: str, seed: int, num_workers: int) -> StreamShare:
        """The split that ``train``, ``val`` or ``test`` reads, in order and whole (no shuffle, nothing dropped), as
        the frozen-feature cache reads it; named by the data set, the split and its info file."""
        name = split if split in self.info.split_sizes else ("test" if split == "val" else "val")
        dataset = open_split(self.root, name, False, seed, self.max_cache_size, self.storage_options, self.cache_dir)
        source = f"{self.root}/{name}\n{self.info.to_json()}"
        label_shape = (len(self.info.class_names),) if self.info.task == "multilabel" else ()
        return StreamShare(dataset, source, self.info.split_sizes[name], num_workers, label_shape)

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {count}" for split, count in self.info.split_sizes.items())
        return f"{self.root}, optimized from {self.info.source} ({self.info.description}): {sizes} images"


class StreamShare:
    """One split of an optimized data set as the frozen-feature cache reads it: in order, this rank's share only
    (LitData shards the split across ranks and workers), labels kept as they come; :meth:`gather` then joins the
    shares of all ranks. ``len`` is the whole split's; ``fingerprint`` names the data set, split and contents."""

    def __init__(self, dataset: Any, source: str, size: int, num_workers: int, label_shape: tuple[int, ...]) -> None:
        self.dataset, self.source, self.size, self.num_workers = dataset, source, size, num_workers
        #: The shape of one label: () for a class index, (classes,) for multi-label 0/1 rows.
        self.label_shape = label_shape
        self._labels: list[Tensor] = []

    def __len__(self) -> int:
        return self.size

    def fingerprint(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def batches(self, batch_size: int) -> Any:
        """(uint8 images, labels) of this rank's share, ``batch_size`` at a time."""
        self._labels = []
        for images, labels in stream_loader(self.dataset, batch_size, self.num_workers, pin_memory=False):
            self._labels.append(labels)
            yield images, labels

    @property
    def labels(self) -> Tensor:
        """The labels of the share read by the last :meth:`batches` (LitData may give a rank none of a small split)."""
        return torch.cat(self._labels) if self._labels else torch.empty(0, *self.label_shape, dtype=torch.int64)

    def gather(self, rows: Tensor, strategy: Any) -> tuple[Tensor, Tensor]:
        """(rows, labels) of the whole split from each rank's share (rank by rank), on every rank."""
        labels = self.labels
        if strategy.world_size > 1:
            device = strategy.root_device
            counts = strategy.all_gather(torch.tensor([len(labels)], device=device)).flatten().tolist()

            def joined(values: Tensor) -> Tensor:  # all_gather needs one shape: pad each share to the longest
                padded = values.new_zeros(max(counts), *values.shape[1:])
                padded[: len(values)] = values
                shares = strategy.all_gather(padded.to(device)).cpu()
                return torch.cat([share[:count] for share, count in zip(shares, counts, strict=True)])

            rows, labels = joined(rows), joined(labels)
        if len(rows) != self.size:
            raise RuntimeError(f"{self.source}: the ranks read {len(rows)} images of {self.size}. Please report it.")
        return rows, labels
