"""Traps a user falls into, each through the command line: exit 2 and one line, or an explicit log line.

Nothing is written or downloaded by a command that stops: no run folder, no ./data.
"""

from __future__ import annotations

import pytest

from tests.conftest import FINETUNE_SGD, stops
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main

CONFIG = FINETUNE_SGD
FAST = ["--trainer.fast_dev_run=true"]


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download CIFAR-10 fails the test."""

    def download(*args, **kwargs):
        raise AssertionError("CIFAR-10 was downloaded")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", download)


def test_a_mistyped_data_dir_is_an_error_not_a_cifar10_download(small_run_args, run_dir, capsys, no_download):
    line = stops(
        ["fit", f"--config={CONFIG}", *small_run_args, f"--data.data_dir={run_dir / 'photoss'}"], capsys, run_dir
    )
    assert "photoss does not exist" in line and "leave it unset for CIFAR-10" in line


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_mistyped_ckpt_path_is_one_line(subcommand, small_run_args, run_dir, capsys):
    line = stops(
        [subcommand, f"--config={CONFIG}", *small_run_args, "--ckpt_path=lightning_logs/nope.ckpt"], capsys, run_dir
    )
    assert "Checkpoint lightning_logs/nope.ckpt does not exist" in line


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(subcommand, small_run_args, run_dir, capsys):
    line = stops([subcommand, f"--config={CONFIG}", *small_run_args], capsys, run_dir)
    assert f"{subcommand} scores a trained model: pass --ckpt_path" in line


@pytest.mark.parametrize(("backbone", "size"), [("googlenet", 64), ("inception_v3", 80)])
def test_networks_with_auxiliary_outputs_train_on_their_main_head(backbone, size, small_run_args, run_dir):
    args = [f"--config={CONFIG}", *small_run_args, f"--model.backbone={backbone}", f"--data.image_size={size}"]
    cli = TransferLightningCLI(args=["fit", *args, *FAST, "--data.batch_size=4", "--test_after_fit=false"])
    assert cli.trainer.global_step == 1  # googlenet without weights returned GoogLeNetOutputs, which the loss refused
    auxiliary = {"googlenet": "aux1", "inception_v3": "AuxLogits"}[backbone]  # built only with aux_logits
    assert getattr(cli.model.network, auxiliary) is None


def test_backbone_lr_scale_without_unfreezing_is_an_error(small_run_args, run_dir, capsys):
    line = stops(["fit", f"--config={CONFIG}", *small_run_args, "--model.backbone_lr_scale=0.5"], capsys, run_dir)
    assert "backbone_lr_scale 0.5" in line and "unfreeze_at_epoch is not set" in line


def test_a_cosine_schedule_of_another_length_than_the_run_is_said_loudly(small_run_args, run_dir):
    scheduler = ["--model.scheduler=CosineAnnealingLR", "--model.scheduler.T_max=30"]
    with pytest.warns(UserWarning, match="T_max 30, but this run has 2 epochs.*stop short of eta_min.*T_max 2"):
        shrink = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
        main(["fit", f"--config={CONFIG}", *small_run_args, *scheduler, *shrink, "--test_after_fit=false"])


def test_a_val_size_larger_than_a_small_tree_says_what_to_set(small_run_args, run_dir, capsys):
    line = stops(["fit", f"--config={CONFIG}", *small_run_args, "--data.val_size=5000"], capsys, run_dir)
    assert "val_size 5000 holds out 5000 images" in line and "has 120" in line
    assert "set --data.val_size to a fraction such as 0.2, or a count below 120" in line
