"""Two-process DDP on CPU (gloo): fit and test run in both modes, and evaluation counts each image once."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from transfer_lightning.reporting.runs import read_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def run_cli(*args: str, cwd: Path) -> None:
    """The real entry point in a fresh process: Lightning's DDP launcher starts the second one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "transfer_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


class RecordTrainingOrder(pl.Callback):
    """Writes, per process and epoch, the positions of the training images its loader serves."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        positions = list(trainer.train_dataloader.sampler)  # the loader as Lightning prepared it for this process
        path = self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        path.write_text(json.dumps({"positions": positions, "train_size": len(trainer.datamodule.train_set)}))


def common(image_folder: Path, cache: Path) -> list[str]:
    # 21 validation and 32 test images: 2 processes cannot split 21 evenly, so padding would show.
    return [
        f"--data.data_dir={image_folder}",
        f"--data.cache_dir={cache}",
        "--data.val_size=21",
        "--data.batch_size=8",
        "--model.weights=null",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


@pytest.mark.parametrize("config", ["feature_extractor_sgd", "finetune_adam"])
def test_ddp_fit_and_test_and_evaluation_equals_single_process(config, image_folder, tmp_path):
    args = [f"--config={CONFIGS / config}.yaml", *common(image_folder, tmp_path / "cache")]
    run_cli("fit", *args, *DDP, cwd=tmp_path)  # version_0: fit, then test of the best checkpoint
    fitted = read_run(tmp_path / "lightning_logs" / "version_0")
    assert fitted.epochs == 1 and fitted.test_score() is not None

    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    for subcommand in ("validate", "test"):
        run_cli(subcommand, *args, *DDP, f"--ckpt_path={checkpoint}", cwd=tmp_path)
        run_cli(
            subcommand,
            *args,
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            f"--ckpt_path={checkpoint}",
            cwd=tmp_path,
        )
    versions = [read_run(tmp_path / "lightning_logs" / f"version_{i}") for i in range(1, 5)]
    ddp_val, single_val, ddp_test, single_test = versions
    assert ddp_val.scalars["val/acc"] == single_val.scalars["val/acc"]
    assert ddp_test.scalars["test/acc"] == single_test.scalars["test/acc"]
    assert ddp_test.scalars["test/acc_cat"] == single_test.scalars["test/acc_cat"]
    # Losses are means over images: 21 images in uneven shares (11 and 10) still give one process's value.
    assert ddp_val.scalars["val/loss"] == pytest.approx(single_val.scalars["val/loss"], abs=1e-6)
    assert ddp_test.scalars["test/loss"] == pytest.approx(single_test.scalars["test/loss"], abs=1e-6)
    # The top losses are gathered from both processes, with each image's position in the test split.
    ddp_top, single_top = (top_losses_of(tmp_path / "lightning_logs" / f"version_{i}") for i in (3, 4))
    assert [index for index, _ in ddp_top] == [index for index, _ in single_top]
    assert [loss for _, loss in ddp_top] == pytest.approx([loss for _, loss in single_top], abs=1e-5)


def top_losses_of(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "top_losses.csv") as file:
        return [(int(row["index"]), float(row["loss"])) for row in csv.DictReader(file)]


def test_ddp_training_shards_are_disjoint_and_cover_the_training_set(image_folder, tmp_path):
    """Each of 2 processes trains on its own half of every epoch, the two halves making up the whole
    training set (one image repeated to even them out, as DistributedSampler pads), in an order that
    changes between epochs."""
    record = {"class_path": "tests.test_ddp.RecordTrainingOrder", "init_args": {"folder": str(tmp_path)}}
    args = [f"--config={CONFIGS / 'finetune_adam'}.yaml", *common(image_folder, tmp_path / "cache")]
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


def test_ddp_multilabel_metrics_equal_a_single_process(tmp_path):
    """mAP and F1 need every image's probabilities at once: under DDP they are gathered from both
    processes, so validate and test give exactly what one process gives (33 images: uneven shares)."""
    from tests.test_multilabel import table_args, write_tagged_table

    table = write_tagged_table(tmp_path / "data", train=40, val=33, test=33)
    args = [*table_args(table, tmp_path / "cache"), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    run_cli("fit", *args, *DDP, "--test_after_fit=false", cwd=tmp_path)
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    for subcommand in ("validate", "test"):
        for devices in (DDP, ["--trainer.devices=1"]):
            run_cli(subcommand, *args, *devices, f"--ckpt_path={checkpoint}", cwd=tmp_path)
    ddp_val, single_val, ddp_test, single_test = (
        read_run(tmp_path / "lightning_logs" / f"version_{i}") for i in range(1, 5)
    )
    for tag in ("val/mAP", "val/f1_macro", "val/f1_micro", "val/loss"):
        assert ddp_val.scalars[tag] == pytest.approx(single_val.scalars[tag], abs=1e-6), tag
    for tag in ("test/mAP", "test/f1_macro", "test/f1_micro", "test/AP_sea", "test/loss"):
        assert ddp_test.scalars[tag] == pytest.approx(single_test.scalars[tag], abs=1e-6), tag
