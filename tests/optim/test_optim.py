"""The optimizer's parameter groups, their learning rates and the schedule's length, by hand."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from transfer_lightning.errors import UserInputError
from transfer_lightning.optim import WarmupCosineLR, build_optimizer, build_scheduler, parameter_groups
from transfer_lightning.optim.groups import run_length


def network() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_one_group_of_the_trainable_parameters():
    net = network()
    net[0].requires_grad_(False)
    (group,) = parameter_groups(net, net[3], set(), split_backbone=False, no_decay_on_norm_and_bias=False)
    assert [id(p) for p in group["params"]] == [id(p) for p in [*net[1].parameters(), *net[3].parameters()]]
    assert "name" not in group  # one group: LearningRateMonitor logs it as lr-<Optimizer>


def test_gradual_unfreezing_keeps_frozen_backbone_parameters_in_their_group_from_the_start():
    net = network()
    net[:2].requires_grad_(False)  # frozen until the unfreeze epoch
    never = {id(p) for p in net[0].parameters()}  # before trainable_from: never trained
    groups = parameter_groups(net, net[3], never, split_backbone=True, no_decay_on_norm_and_bias=True)
    by_name = {group["name"]: {id(p) for p in group["params"]} for group in groups}
    assert by_name == {
        "head": {id(net[3].weight)},
        "head no decay": {id(net[3].bias)},
        "backbone": set(),
        "backbone no decay": {id(net[1].weight), id(net[1].bias)},  # BatchNorm: no weight decay
    }
    assert all(group["weight_decay"] == 0.0 for group in groups if group["name"].endswith("no decay"))


def test_the_backbone_learns_at_its_scale_and_bad_arguments_are_config_errors():
    net = network()

    def groups() -> list[dict]:  # new ones each time: torch's optimizers write their defaults into the dicts
        return parameter_groups(net, net[3], set(), split_backbone=True, no_decay_on_norm_and_bias=False)

    optimizer = build_optimizer(functools.partial(torch.optim.SGD, lr=0.1), groups(), backbone_lr_scale=0.25)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"head": 0.1, "backbone": pytest.approx(0.025)}
    with pytest.raises(UserInputError, match="learning rate must be positive"):
        build_optimizer(functools.partial(torch.optim.SGD, lr=0.0), groups(), None)
    with pytest.raises(UserInputError, match="model.optimizer rejected its arguments"):
        build_optimizer(functools.partial(torch.optim.SGD, lr=0.1, momentum=-1), groups(), None)


def test_a_schedule_without_total_steps_gets_the_run_length():
    trainer = SimpleNamespace(estimated_stepping_batches=40, max_epochs=4)
    assert run_length("step", trainer) == 40 and run_length("epoch", trainer) == 4
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    factory = functools.partial(WarmupCosineLR, warmup_steps=10, total_steps=None)  # as LightningCLI binds it
    scheduler = build_scheduler(factory, optimizer, "step", trainer)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[10] == pytest.approx(1.0) and rates[0] == pytest.approx(0.01)  # warmup from start_factor
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to 0 at the 40th step
