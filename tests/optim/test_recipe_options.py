"""Recipe options of the optimization: per-step and per-epoch schedules, label smoothing, no weight decay on
normalisation layers and biases."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.errors import UserInputError
from transfer_lightning.model import TransferClassifier
from transfer_lightning.reporting.runs import read_run
from transfer_lightning.schedules import WarmupCosineLR

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
STEPS = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1"]
STEPS += ["--test_after_fit=false", "--model.optimizer=SGD", "--model.optimizer.lr=0.1"]


def fit(small_run_args: list[str], *args: str) -> TransferLightningCLI:
    return TransferLightningCLI(args=["fit", *small_run_args, *STEPS, *args])


def test_warmup_cosine_steps_per_optimizer_step_from_the_config(small_run_args, run_dir):
    scheduler = ["--model.scheduler=transfer_lightning.schedules.WarmupCosineLR", "--model.scheduler.warmup_steps=2"]
    cli = fit(small_run_args, *scheduler, "--model.scheduler_interval=step")
    assert cli.trainer.lr_scheduler_configs[0].interval == "step"

    # What torch's own schedulers give over the run's 6 optimizer steps (total_steps filled in by the model).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = SequentialLR(
        optimizer,
        [LinearLR(optimizer, 0.01, 1.0, total_iters=2), CosineAnnealingLR(optimizer, T_max=4)],
        milestones=[2],
    )
    expected = []
    for _ in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    logged = read_run(run_dir / "lightning_logs" / "version_0").scalars["lr-SGD"]
    assert logged == pytest.approx(expected, rel=1e-6)  # logged once per step, before the step


def test_one_cycle_without_total_steps_gets_the_whole_run(small_run_args, run_dir):
    scheduler = ["--model.scheduler=torch.optim.lr_scheduler.OneCycleLR", "--model.scheduler.max_lr=0.1"]
    cli = fit(small_run_args, *scheduler, "--model.scheduler_interval=step")
    one_cycle = cli.trainer.lr_scheduler_configs[0].scheduler
    assert one_cycle.total_steps == 6 and one_cycle.last_epoch == 6
    logged = read_run(run_dir / "lightning_logs" / "version_0").scalars["lr-SGD"]
    assert len(logged) == 6 and max(logged) == pytest.approx(0.1, rel=0.05)  # the peak: max_lr
    assert logged[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)  # the last step: the end of the cycle


def test_epoch_interval_schedules_count_epochs(small_run_args, run_dir):
    scheduler = ["--model.scheduler=transfer_lightning.optim.WarmupCosineLR", "--model.scheduler.warmup_steps=1"]
    cli = fit(small_run_args, *scheduler)
    assert cli.trainer.lr_scheduler_configs[0].interval == "epoch"
    assert cli.trainer.lr_scheduler_configs[0].scheduler._schedulers[1].T_max == 1  # 2 epochs, 1 of warmup
    assert len(read_run(run_dir / "lightning_logs" / "version_0").scalars["lr-SGD"]) == 2


def test_bad_schedule_settings_are_clear_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserInputError, match="warmup_steps"):
        WarmupCosineLR(optimizer, warmup_steps=6, total_steps=6)
    with pytest.raises(UserInputError, match="scheduler_interval"):
        TransferClassifier(weights=None, scheduler_interval="batch")
    with pytest.raises(UserInputError, match="label_smoothing"):
        TransferClassifier(weights=None, label_smoothing=1.0)


def test_label_smoothing_is_in_the_training_loss_only():
    model = TransferClassifier(backbone="resnet18", weights=None, num_classes=4, label_smoothing=0.2)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    model.eval()  # the same logits in both calls
    with torch.no_grad():
        logits = model(images)
        loss = model.training_step((images, labels), 0)
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.2)), rel=1e-6)
    assert loss != pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-3)


@pytest.mark.parametrize("freeze", [False, True])
def test_no_weight_decay_on_norm_and_bias(freeze):
    model = TransferClassifier(
        backbone="mobilenet_v2",
        weights=None,
        num_classes=3,
        freeze_backbone=freeze,
        no_weight_decay_on_norm_and_bias=True,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
    )
    decayed, exempt = model.configure_optimizers().param_groups
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for p in decayed["params"] + exempt["params"]} == trainable
    assert all(p.ndim > 1 for p in decayed["params"])  # convolution and linear weights only
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    batchnorm_parameters = {id(p) for m in batchnorms for p in m.parameters()}
    assert all(names[id(p)].endswith(".bias") or id(p) in batchnorm_parameters for p in exempt["params"])
    expected_exempt = 1 if freeze else 2 * 52 + 1  # the head's bias; or 52 BatchNorms' weight and bias too
    assert len(exempt["params"]) == expected_exempt

    plain = TransferClassifier(backbone="mobilenet_v2", weights=None, num_classes=3, freeze_backbone=freeze)
    assert len(plain.configure_optimizers().param_groups) == 1
