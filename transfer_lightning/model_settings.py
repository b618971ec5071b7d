"""The model's settings checked once, before anything is built: out-of-range values and contradictions."""

from __future__ import annotations

from typing import Any

from transfer_lightning.errors import UserInputError


def check_model_settings(a: dict[str, Any]) -> None:
    """Refuse values of :class:`~transfer_lightning.model.TransferClassifier`'s arguments ``a`` that are out of
    range or contradict each other, each with a message that says what to set instead."""
    if a["head_solver"] not in ("gradient", "lbfgs"):
        raise UserInputError(f"head_solver must be gradient or lbfgs, got {a['head_solver']!r}.")
    if a["head_solver"] == "lbfgs" and (not a["freeze_backbone"] or a["unfreeze_at_epoch"] is not None):
        raise UserInputError(
            "head_solver lbfgs fits a linear head on frozen features: set freeze_backbone true "
            "(and no unfreeze_at_epoch), or use head_solver gradient."
        )
    if a["head"] not in ("linear", "mlp"):
        raise UserInputError(f"head must be linear or mlp, got {a['head']!r}.")
    if a["head_solver"] == "lbfgs" and a["head"] != "linear":
        raise UserInputError("head_solver lbfgs fits a linear head: set head linear, or head_solver gradient.")
    if a["adapt_bn_stats"] and (not a["freeze_backbone"] or a["update_bn_stats"]):
        raise UserInputError(
            "adapt_bn_stats recomputes the frozen backbone's BatchNorm statistics once and keeps them: set "
            "freeze_backbone true and update_bn_stats false (which lets them drift every step instead)."
        )
    if a["class_names"] is not None and len(a["class_names"]) != a["num_classes"]:
        raise UserInputError(f"{len(a['class_names'])} class_names given for num_classes={a['num_classes']}.")
    if a["scheduler_interval"] not in ("epoch", "step"):
        raise UserInputError(f"scheduler_interval must be epoch or step, got {a['scheduler_interval']!r}.")
    if not 0 <= a["label_smoothing"] < 1:
        raise UserInputError(f"label_smoothing must be in [0, 1), got {a['label_smoothing']}.")
    unfreeze_at, scale = a["unfreeze_at_epoch"], a["backbone_lr_scale"]
    if unfreeze_at is not None and (not a["freeze_backbone"] or unfreeze_at < 0):
        raise UserInputError(
            f"unfreeze_at_epoch {unfreeze_at} needs freeze_backbone: true and an epoch >= 0 "
            "(the backbone is frozen until then)."
        )
    if scale is not None and unfreeze_at is None:
        raise UserInputError(
            f"backbone_lr_scale {scale} scales the backbone's learning rate after gradual "
            "unfreezing, but unfreeze_at_epoch is not set: set both (with freeze_backbone: true), or neither."
        )
    if scale is not None and scale <= 0:
        raise UserInputError(f"backbone_lr_scale must be positive, got {scale}.")
    if a["task"] not in (None, "multiclass", "multilabel"):
        raise UserInputError(f"task must be multiclass, multilabel or null, got {a['task']!r}.")
    if a["threshold"] is not None and a["task"] == "multiclass":
        raise UserInputError("model.threshold is the decision threshold of multilabel models; task is multiclass.")
    if a["threshold"] is not None and not 0 < a["threshold"] < 1:
        raise UserInputError(f"threshold must be a probability between 0 and 1 (e.g. 0.5), got {a['threshold']}.")
    if a["known_rate"] is not None and not 0 < a["known_rate"] <= 1:
        raise UserInputError(
            f"known_rate is the share of known images to keep (e.g. 0.95), in (0, 1]; got {a['known_rate']}. "
            "Use null to never answer unknown."
        )
    if a["trainable_from"] is not None and a["freeze_backbone"] and unfreeze_at is None:
        raise UserInputError(
            f"trainable_from {a['trainable_from']!r} says where fine-tuning starts, but freeze_backbone: true "
            "trains only the head: set freeze_backbone false, or unfreeze_at_epoch."
        )
