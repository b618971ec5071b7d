"""Two-process DDP on CPU (gloo): fit and test run in both modes, and evaluation counts each image once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from transfer_lightning.report import read_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def run_cli(*args: str, cwd: Path) -> None:
    """The real entry point in a fresh process: Lightning's DDP launcher starts the second one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "transfer_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


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
    assert fitted.epochs == 1 and fitted.test_acc() is not None

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
