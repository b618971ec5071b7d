"""What a checkpoint carries, read without the training data or its config, and whether it fits a model.

Every checkpoint holds the model's hyperparameters (``backbone``, ``class_names``, ...), the data
module's (``image_size``, ``normalization``, ...) and the data module's state: the
:class:`~transfer_lightning.data.transforms.Preprocessing` that turns an image file into the
network's input. Older checkpoints, saved before that state was recorded, lack it; what can be
recovered from their hyperparameters is, and the rest fails with a message that says what to pass instead.
"""

from __future__ import annotations

import math
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
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as error:
        raise UserInputError(
            f"{path} is not a checkpoint saved by Lightning, or it is damaged: cut short by a copy or a full disk "
            f"({type(error).__name__}). Use another .ckpt of the run, e.g. last.ckpt or best-*.ckpt."
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "backbone" not in hparams or "state_dict" not in checkpoint:
        raise UserInputError(
            f"{path} is not a checkpoint of transfer_lightning's TransferClassifier. "
            "Pass a .ckpt file that fit wrote (lightning_logs/version_N/checkpoints/)."
        )
    return checkpoint


#: Model settings that decide the optimizer's parameter groups: a resumed fit must keep the checkpoint's.
PARAMETER_GROUP_HPARAMS = ["freeze_backbone", "trainable_from", "unfreeze_at_epoch", "no_weight_decay_on_norm_and_bias"]


def check_compatible(saved: dict[str, Any], current: dict[str, Any], resuming_fit: bool) -> None:
    """Refuse a checkpoint whose hyperparameters ``saved`` were of another backbone or class count than
    ``current``'s; when ``resuming_fit``, also one whose optimizer parameter groups would differ."""
    keys = ["backbone", "head", "stage_features", "num_classes", "task"]
    keys += PARAMETER_GROUP_HPARAMS if resuming_fit else []
    # Older checkpoints name no task (multiclass), head (linear) nor stage features. A model without a resolved task
    # takes the data's.
    saved = {"task": "multiclass", "head": "linear", "stage_features": None, **saved}
    current = {**current, "task": current.get("task") or saved["task"]}
    for key in keys:
        if key in saved and key in current and saved[key] != current[key]:
            raise UserInputError(
                f"The checkpoint was trained with {key}={saved[key]!r}, but this model has {key}={current[key]!r}. "
                f"Use a config with {key}: {saved[key]!r}, or another checkpoint."
            )


def upgrade_state_dict(state_dict: dict[str, Any]) -> None:
    """Rename, in place, what checkpoints saved before the task objects hold under older names:
    a multi-label model's decision thresholds were the model's own buffer, and are now its task's; and give
    a multiclass model saved before calibration its temperature of 1, and one saved before "none of these" no
    unknown threshold (every image is given a known class, as then)."""
    if "thresholds" in state_dict:
        state_dict["task.thresholds"] = state_dict.pop("thresholds")
    if "task.thresholds" not in state_dict:  # multiclass: the softmax as it was, and no image called unknown
        state_dict.setdefault("task.temperature", torch.ones(()))
        state_dict.setdefault("task.unknown_threshold", torch.tensor(math.inf))


def model_hparams(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model's hyperparameters as this version takes them (``backbone_lr_scale`` was 0.1 even
    without ``unfreeze_at_epoch`` in older checkpoints; it now means "not set" there; and
    those checkpoints, which do not name their task, are multiclass)."""
    hparams = {key: value for key, value in checkpoint["hyper_parameters"].items() if key != "_instantiator"}
    hparams.setdefault("task", "multiclass")
    if hparams.get("unfreeze_at_epoch") is None and "backbone_lr_scale" in hparams:
        hparams["backbone_lr_scale"] = None
    return hparams


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
    """How images were prepared for the network; older checkpoints do not say."""
    saved = checkpoint.get(ImageFolderDataModule.__qualname__, {})  # where Lightning keeps its state_dict()
    if "preprocessing" not in saved:
        raise UserInputError(
            f"{path} was saved by an older transfer_lightning and does not record how its images were prepared. "
            "Train it again with this version, or resume it for one more epoch (fit --ckpt_path ... "
            "--trainer.max_epochs N+1) to get a checkpoint that does."
        )
    return Preprocessing.from_dict(saved["preprocessing"])
