"""What a checkpoint carries for inference, read without the training data or its config.

Every checkpoint holds the model's hyperparameters (``backbone``, ``class_names``, ...), the data
module's (``image_size``, ``normalization``, ...) and the data module's state: the
:class:`~transfer_lightning.data.transforms.Preprocessing` that turns an image file into the
network's input. Checkpoints of transfer_lightning 0.1 lack that state; what can be recovered from
their hyperparameters is, and the rest fails with a message that says what to pass instead.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.data.transforms import Preprocessing
from transfer_lightning.errors import UserInputError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be one of a :class:`TransferClassifier`."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"Checkpoint {path} does not exist. Pass a .ckpt file from lightning_logs/*/checkpoints.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as error:
        raise UserInputError(f"{path} is not a checkpoint saved by Lightning ({type(error).__name__}).") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "backbone" not in hparams or "state_dict" not in checkpoint:
        raise UserInputError(
            f"{path} is not a checkpoint of transfer_lightning's TransferClassifier. "
            "Pass a .ckpt file that fit wrote (lightning_logs/version_N/checkpoints/)."
        )
    return checkpoint


def class_names(checkpoint: dict[str, Any]) -> list[str]:
    """The class names in label order (their numbers for checkpoints that were trained without names)."""
    hparams = checkpoint["hyper_parameters"]
    return list(hparams.get("class_names") or (str(i) for i in range(hparams["num_classes"])))


def data_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The data module arguments that ``predict --data.predict_dir`` takes from the checkpoint."""
    data_hparams = checkpoint.get("datamodule_hyper_parameters", {})
    settings = {key: data_hparams[key] for key in ("image_size", "normalization") if key in data_hparams}
    return settings | {"class_names": class_names(checkpoint)}


def preprocessing(checkpoint: dict[str, Any], path: str | Path) -> Preprocessing:
    """How images were prepared for the network; checkpoints of version 0.1 do not say."""
    saved = checkpoint.get(ImageFolderDataModule.__qualname__, {})  # where Lightning keeps its state_dict()
    if "preprocessing" not in saved:
        raise UserInputError(
            f"{path} was saved by transfer_lightning 0.1 and does not record how its images were prepared. "
            "Train it again with this version, or resume it for one more epoch (fit --ckpt_path ... "
            "--trainer.max_epochs N+1) to get a checkpoint that does."
        )
    return Preprocessing.from_dict(saved["preprocessing"])
