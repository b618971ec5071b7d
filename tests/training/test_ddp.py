"""Two-process DDP on CPU (gloo): fit and test run in both modes, and evaluation counts each image once."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest

from tests.conftest import DDP, run_cli, small_ddp_args, table_args, write_tagged_table
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.reporting.runs import read_run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class RecordTrainingOrder(pl.Callback):
    """Writes, per process and epoch, the positions of the training images its loader serves."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        positions = list(trainer.train_dataloader.sampler)  # the loader as Lightning prepared it for this process
        path = self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        path.write_text(json.dumps({"positions": positions, "train_size": len(trainer.datamodule.train_set)}))


def in_one_process(subcommand: str, args: list[str], checkpoint: Path, cwd: Path, monkeypatch) -> dict[str, float]:
    """The same evaluation of ``checkpoint`` in this process, on one device: what it logged."""
    monkeypatch.chdir(cwd)
    single = ["--trainer.accelerator=cpu", "--trainer.devices=1", f"--ckpt_path={checkpoint}"]
    cli = TransferLightningCLI(args=[subcommand, *args, *single])
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


@pytest.mark.parametrize(
    "config",
    ["feature_extractor_sgd", pytest.param("finetune_adam", marks=pytest.mark.slow)],  # the suite's time
)
def test_ddp_fit_and_test_and_evaluation_equals_single_process(config, image_folder, tmp_path, monkeypatch):
    """One DDP fit (validation each epoch, then the test of the best checkpoint, here the only one) scores
    what one process scores on the same checkpoint. The frozen config tests on cached features both ways; its
    validation in fit sees features and a plain validate sees images, so only the fine-tuned one compares those."""
    args = [f"--config={CONFIGS / config}.yaml", *small_ddp_args(image_folder, tmp_path / "cache")]
    run_cli("fit", *args, *DDP, cwd=tmp_path)  # version_0
    ddp = read_run(tmp_path / "lightning_logs" / "version_0")
    assert ddp.epochs == 1 and ddp.test_score() is not None
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    single_test = in_one_process("test", args, checkpoint, tmp_path, monkeypatch)  # version_1
    for tag in ("test/acc", "test/acc_cat"):
        assert ddp.scalars[tag][-1] == pytest.approx(single_test[tag], abs=1e-6), tag
    # Losses are means over images: uneven shares (21 validation images: 11 and 10) still give one process's value.
    assert ddp.scalars["test/loss"][-1] == pytest.approx(single_test["test/loss"], abs=1e-6)
    # The top losses are gathered from both processes, with each image's position in the test split.
    ddp_top, single_top = (top_losses_of(tmp_path / "lightning_logs" / f"version_{i}") for i in (0, 1))
    assert [index for index, _ in ddp_top] == [index for index, _ in single_top]
    assert [loss for _, loss in ddp_top] == pytest.approx([loss for _, loss in single_top], abs=1e-5)
    if config == "finetune_adam":
        single_val = in_one_process("validate", args, checkpoint, tmp_path, monkeypatch)
        assert ddp.scalars["val/acc"][-1] == pytest.approx(single_val["val/acc"], abs=1e-6)
        assert ddp.scalars["val/loss"][-1] == pytest.approx(single_val["val/loss"], abs=1e-6)


def top_losses_of(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "top_losses.csv") as file:
        return [(int(row["index"]), float(row["loss"])) for row in csv.DictReader(file)]


def test_ddp_training_shards_are_disjoint_and_cover_the_training_set(image_folder, tmp_path):
    """Each of 2 processes trains on its own half of every epoch, the two halves making up the whole
    training set (one image repeated to even them out, as DistributedSampler pads), in an order that
    changes between epochs."""
    record = {"class_path": "tests.training.test_ddp.RecordTrainingOrder", "init_args": {"folder": str(tmp_path)}}
    args = [f"--config={CONFIGS / 'finetune_adam'}.yaml", *small_ddp_args(image_folder, tmp_path / "cache")]
    args += ["--trainer.max_epochs=2", "--test_after_fit=false", f"--trainer.callbacks+={json.dumps(record)}"]
    run_cli("fit", *args, *DDP, cwd=tmp_path)
    for epoch in (0, 1):
        shares = [json.loads((tmp_path / f"rank{rank}-epoch{epoch}.json").read_text()) for rank in (0, 1)]
        size = shares[0]["train_size"]
        positions = [share["positions"] for share in shares]
        assert size == 120 - 21 and all(len(share) == math.ceil(size / 2) for share in positions)
        assert set(positions[0]) | set(positions[1]) == set(range(size))
        assert len(set(positions[0]) & set(positions[1])) == 2 * math.ceil(size / 2) - size
    first, second = (json.loads((tmp_path / f"rank0-epoch{epoch}.json").read_text())["positions"] for epoch in (0, 1))
    assert first != second


def test_ddp_multilabel_metrics_equal_a_single_process(tmp_path, monkeypatch):
    """mAP and F1 need every image's probabilities at once: under DDP they are gathered from both
    processes, so validation (with the thresholds picked on it) and the test give exactly what one process
    gives (33 images: uneven shares)."""

    table = write_tagged_table(tmp_path / "data", train=40, val=33, test=33)
    args = [*table_args(table, tmp_path / "cache"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    run_cli("fit", *args, *DDP, cwd=tmp_path)  # validates, then tests its only checkpoint
    ddp = read_run(tmp_path / "lightning_logs" / "version_0")
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    single = in_one_process("validate", args, checkpoint, tmp_path, monkeypatch)
    single |= in_one_process("test", args, checkpoint, tmp_path, monkeypatch)
    tags = ["val/mAP", "val/f1_macro", "val/f1_micro", "val/loss", "test/mAP", "test/f1_macro", "test/f1_micro"]
    for tag in [*tags, "test/AP_sea", "test/loss"]:
        assert ddp.scalars[tag][-1] == pytest.approx(single[tag], abs=1e-6), tag
