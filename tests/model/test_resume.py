"""An interrupted fit leaves last.ckpt; resuming from it ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune_sgd.yaml"


class InterruptAtStep(pl.Callback):
    """Acts like Ctrl+C before training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class TerminateAtStep(pl.Callback):
    """Sends this process SIGTERM (as SLURM or a container runtime would) before training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class WeightsAtStart(pl.Callback):
    """Keeps a copy of the weights and the step when training starts, after Lightning restored a checkpoint."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.weights = {key: value.clone() for key, value in pl_module.state_dict().items()}


def fit_args(small_run_args: list[str], log_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--config={CONFIG}",
        *small_run_args,
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=3",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        *extra,
    ]


def interrupt_and_resume(small_run_args: list[str], log_dir: Path, step: int, *extra: str) -> TransferLightningCLI:
    interrupt = {"class_path": "tests.model.test_resume.InterruptAtStep", "init_args": {"step": step}}
    with pytest.raises(SystemExit):  # Lightning exits with status 1 after a KeyboardInterrupt
        main(fit_args(small_run_args, log_dir, f"--trainer.callbacks+={interrupt}"))
    last = log_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == step
    resumed = TransferLightningCLI(args=fit_args(small_run_args, log_dir, "--ckpt_path=last", *extra))
    resumed.saved_state = saved["state_dict"]
    assert resumed.trainer.global_step == 9 and resumed.trainer.current_epoch == 3
    return resumed


def test_resume_at_an_epoch_boundary_is_bit_exact(small_run_args, run_dir):
    expected = TransferLightningCLI(args=fit_args(small_run_args, run_dir / "straight")).model.state_dict()
    resumed = interrupt_and_resume(small_run_args, run_dir / "interrupted", step=3)
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_resume_mid_epoch_finishes_the_run(small_run_args, run_dir):
    # The DataLoader does not record its position, so the resumed epoch restarts its batch order
    # (Lightning warns about it): the run completes, but is not bit-identical to an uninterrupted one.
    start = {"class_path": "tests.model.test_resume.WeightsAtStart"}
    # --ckpt_path last needs no pretrained weights: the checkpoint's replace them (this file does not exist).
    no_weights = "--model.weights=weights_deleted_since.pth"
    resumed = interrupt_and_resume(small_run_args, run_dir, 4, f"--trainer.callbacks+={start}", no_weights)
    (at_start,) = [callback for callback in resumed.trainer.callbacks if isinstance(callback, WeightsAtStart)]
    # It went on from the checkpoint (step 4, its weights), not from the start, and trained the 5 steps left.
    assert at_start.step == 4
    assert all(torch.equal(at_start.weights[key], value) for key, value in resumed.saved_state.items())
    trained = [
        key for key, value in resumed.model.state_dict().items() if not torch.equal(value, at_start.weights[key])
    ]
    assert "network.fc.weight" in trained and resumed.trainer.global_step == 9


def test_resume_last_without_any_checkpoint_is_a_clear_error(small_run_args, run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(small_run_args, run_dir / "empty", "--ckpt_path=last"))
    assert exit_info.value.code == 2
    assert "no last.ckpt under" in capsys.readouterr().err


def test_sigterm_leaves_a_checkpoint_to_resume_from(small_run_args, run_dir):
    terminate = {"class_path": "tests.model.test_resume.TerminateAtStep", "init_args": {"step": 4}}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):  # Lightning stops at the next step with SIGTERMException
            main(fit_args(small_run_args, run_dir, f"--trainer.callbacks+={terminate}"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    last = run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] in (4, 5)
