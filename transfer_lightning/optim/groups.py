"""The optimizer's parameter groups and the scheduler's length: pure helpers of ``configure_optimizers``.

They take the network and the trainer as arguments, as Lightning's ``BaseFinetuning`` helpers do,
and never import the model.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from transfer_lightning.errors import UserInputError

#: Layers whose parameters ``no_weight_decay_on_norm_and_bias`` exempts from weight decay.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def parameter_groups(
    network: nn.Module,
    head: nn.Module,
    never_trained: set[int],
    split_backbone: bool,
    no_decay_on_norm_and_bias: bool,
    lr_scales: dict[int, float] | None = None,
) -> list[dict[str, Any]]:
    """The parameters of ``network`` to optimize, in named groups when there are several.

    ``never_trained`` holds the ids of parameters frozen for the whole run (before
    ``trainable_from``). With ``split_backbone`` (gradual unfreezing): ``head`` and ``backbone``, the
    backbone's group holding its parameters while they are still frozen, so the groups never change
    mid-run. Otherwise one group of the trainable parameters. With ``no_decay_on_norm_and_bias`` each
    group is split again into decayed weights and ``... no decay`` (normalisation layers and biases,
    weight decay 0). With ``lr_scales`` (parameter id -> factor: layer-wise decay) each group is split
    by factor, which it holds as ``lr_scale`` (timm's key) for :func:`build_optimizer` to apply.
    """
    named = [
        (n, p)
        for n, p in network.named_parameters()
        if p.requires_grad or (split_backbone and id(p) not in never_trained)
    ]
    if split_backbone:
        in_head = {id(p) for p in head.parameters()}
        parts = {
            "head": [(n, p) for n, p in named if id(p) in in_head],
            "backbone": [(n, p) for n, p in named if id(p) not in in_head],
        }
    else:
        parts = {"all": named}
    groups = []
    if no_decay_on_norm_and_bias:
        norms = {id(p) for module in network.modules() if isinstance(module, NORM_LAYERS) for p in module.parameters()}
        exempt = lambda name, p: id(p) in norms or name.endswith(".bias")  # noqa: E731
        for part, params in parts.items():
            groups.append({"params": [p for n, p in params if not exempt(n, p)], "name": part})
            no_decay = [p for n, p in params if exempt(n, p)]
            groups.append({"params": no_decay, "weight_decay": 0.0, "name": f"{part} no decay"})
    else:
        groups = [{"params": [p for _, p in params], "name": part} for part, params in parts.items()]
    if lr_scales is not None:
        groups = [scaled for group in groups for scaled in _split_by_scale(group, lr_scales)]
    if len(groups) == 1:
        del groups[0]["name"]  # one group: LearningRateMonitor logs it as lr-<Optimizer>, as always
    return groups


def _split_by_scale(group: dict[str, Any], lr_scales: dict[int, float]) -> list[dict[str, Any]]:
    by_scale: dict[float, list[nn.Parameter]] = {}
    for parameter in group["params"]:
        by_scale.setdefault(lr_scales.get(id(parameter), 1.0), []).append(parameter)
    return [
        {**group, "params": params, "lr_scale": scale, "name": f"{group['name']} x{scale:.3g}"}
        for scale, params in sorted(by_scale.items())
    ]


def optimization(
    factory, scheduler_factory, groups: list[dict[str, Any]], backbone_lr_scale: float | None, interval: str, trainer
) -> Optimizer | dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimizer of :func:`build_optimizer`, with the scheduler of
    :func:`build_scheduler` when there is one (stepped per ``interval``)."""
    optimizer = build_optimizer(factory, groups, backbone_lr_scale)
    if scheduler_factory is None:
        return optimizer
    scheduler = build_scheduler(scheduler_factory, optimizer, interval, trainer)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"},
    }


def build_optimizer(factory, groups: list[dict[str, Any]], backbone_lr_scale: float | None) -> Optimizer:
    """``factory(groups)``, the ``backbone`` groups' learning rate scaled by ``backbone_lr_scale`` and every
    group's by its ``lr_scale`` (layer-wise decay); bad arguments are a config error.

    The rates are set before any scheduler is built, so that torch's and Lightning's schedulers, which
    start from each group's ``lr``, keep the ratios (timm applies ``lr_scale`` in its own schedulers only).
    """
    try:
        optimizer = factory(groups)
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"model.optimizer rejected its arguments: {error}. Fix model.optimizer.init_args."
        ) from None
    if any(group["lr"] <= 0 for group in optimizer.param_groups):
        raise UserInputError(f"The learning rate must be positive, got {optimizer.param_groups[0]['lr']}.")
    for group in optimizer.param_groups:
        if backbone_lr_scale is not None and group.get("name", "").startswith("backbone"):
            group["lr"] *= backbone_lr_scale
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer


def build_scheduler(factory, optimizer: Optimizer, interval: str, trainer: pl.Trainer) -> LRScheduler:
    """``factory(optimizer)`` with ``total_steps`` filled from the run when it takes one and was not given it.

    A ``CosineAnnealingLR`` whose ``T_max`` differs from the run's length gets a warning: its rate
    would stop short of ``eta_min``, or climb again after ``T_max``.
    """
    length = run_length(interval, trainer)
    needs_total_steps = _needs_total_steps(factory)
    if needs_total_steps and length is None:
        raise UserInputError(
            "The scheduler needs total_steps: set trainer.max_epochs or model.scheduler's total_steps."
        )
    try:
        scheduler = factory(optimizer, **({"total_steps": length} if needs_total_steps else {}))
    except (TypeError, ValueError) as error:
        raise UserInputError(
            f"model.scheduler rejected its arguments: {error}. Fix model.scheduler.init_args."
        ) from None
    if isinstance(scheduler, CosineAnnealingLR) and length is not None and scheduler.T_max != length:
        unit = "optimizer steps" if interval == "step" else "epochs"
        rank_zero_warn(
            f"model.scheduler CosineAnnealingLR has T_max {scheduler.T_max}, but this run has {length} {unit}: "
            f"its learning rate will {'stop short of eta_min' if scheduler.T_max > length else 'rise again'}. "
            f"Set --model.scheduler.init_args.T_max {length} to decay over the whole run.",
            category=UserWarning,
        )
    return scheduler


def run_length(interval: str, trainer: pl.Trainer) -> int | None:
    """The run's length in scheduler steps: optimizer steps, or epochs; ``None`` when it has no set end."""
    if interval == "step":
        return int(trainer.estimated_stepping_batches)
    return trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 1 else None


def _needs_total_steps(factory) -> bool:
    """Whether the scheduler takes ``total_steps`` and the config left it unset (nor OneCycleLR's epochs)."""
    if isinstance(factory, functools.partial):  # what LightningCLI builds: the class with every argument bound
        arguments = factory.keywords
    else:
        arguments = {name: p.default for name, p in inspect.signature(factory).parameters.items()}
    unset = lambda name: name in arguments and arguments[name] is None  # noqa: E731
    given_epochs = "epochs" in arguments and not unset("epochs")  # OneCycleLR(epochs, steps_per_epoch)
    return unset("total_steps") and not given_epochs
