"""The recipe configs: each runs, and each of its settings is commented."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_test_scores_by_hand
from transfer_lightning.commands.cli import TransferLightningCLI

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
STEPS = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1"]
STEPS += ["--test_after_fit=false", "--model.optimizer=SGD", "--model.optimizer.lr=0.1"]


def fit(small_run_args: list[str], *args: str) -> TransferLightningCLI:
    return TransferLightningCLI(args=["fit", *small_run_args, *STEPS, *args])


# --- gradual unfreezing --------------------------------------------------------------------------


# --- partial fine-tuning -------------------------------------------------------------------------


# --- flip test-time augmentation -----------------------------------------------------------------


# --- recipe configs ------------------------------------------------------------------------------

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.filterwarnings("ignore:model.scheduler .* has T_max")  # the recipes are cut to 2 epochs here
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_configs_run_and_comment_every_setting(recipe, small_run_args, run_dir):
    settings = [line for line in recipe.read_text().splitlines() if ":" in line and not line.lstrip().startswith("#")]
    uncommented = [line for line in settings if line.split(":", 1)[1].strip() and "#" not in line]
    assert not uncommented, f"settings without a comment in {recipe.name}: {uncommented}"
    shrink = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    shrink += ["--trainer.limit_test_batches=0.5", "--data.image_size=64"]
    if "warmup_steps" in recipe.read_text():  # 4 optimizer steps in all here
        shrink.append("--model.scheduler.warmup_steps=1")
    if "head_solver: lbfgs" in recipe.read_text():
        # A random MobileNetV2 gives these images near-constant features, whose gradients are below L-BFGS's
        # tolerance from the start (Adam rescales them); a random ResNet18's features carry their colours.
        shrink.append("--model.backbone=resnet18")
    cli = TransferLightningCLI(args=["fit", f"--config={recipe}", *small_run_args, *shrink])
    assert cli.trainer.current_epoch == 2
    # The test score is the network's own on its test batch (with the mirror images where the recipe says so).
    assert_test_scores_by_hand(cli, batches=1, autocast=cli.trainer.precision == "bf16-mixed")
