"""Weight EMA (--ema.*): what is evaluated and checkpointed is torch's exponential moving average of the weights."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import prepared_by_hand
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune_sgd.yaml"
DECAY, START = 0.7, 1


class RecordWeights(pl.Callback):
    """The model's state after every optimizer step: what the average is made from."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({key: value.detach().clone() for key, value in pl_module.state_dict().items()})


def by_hand_ema(states: list[dict[str, torch.Tensor]], decay: float, start: int) -> dict[str, torch.Tensor]:
    """ema = the weights after step ``start`` (0-based), then ema = decay * ema + (1 - decay) * weights."""
    ema = None
    for state in states[start:]:
        if ema is None:
            ema = {key: value.double() for key, value in state.items() if value.is_floating_point()}
        else:
            ema = {key: decay * value + (1 - decay) * state[key].double() for key, value in ema.items()}
    return ema


def run_args(small_run_args, root: Path, *extra: str) -> list[str]:
    return [
        f"--config={CONFIG}",
        *small_run_args,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        f"--trainer.logger.init_args.save_dir={root}",
        "--seed_everything=0",
        *extra,
    ]


def fit(small_run_args, root: Path, *extra: str) -> TransferLightningCLI:
    return TransferLightningCLI(args=["fit", *run_args(small_run_args, root, *extra)])


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_evaluated_and_checkpointed_weights_are_torchs_ema(small_run_args, run_dir, head):
    """After 6 steps with decay 0.7 from step 1: the checkpoints' weights, the model after fit and the
    weights the test after fit scored are the EMA computed by hand from the recorded weights; the
    trained weights are kept beside them for resuming. The mlp head's BatchNorm statistics are averaged too."""
    recorder = {"class_path": "tests.training.test_ema.RecordWeights"}
    cli = fit(
        small_run_args,
        run_dir,
        "--ema.enabled=true",
        "--data.class_balance=loss",  # the model's setup adds a buffer (the loss's class weights) after ours
        f"--ema.decay={DECAY}",
        f"--ema.start_step={START}",
        f"--trainer.callbacks+={recorder}",
        f"--model.head={head}",
    )
    (record,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordWeights)]
    assert len(record.states) == 6
    expected = by_hand_ema(record.states, DECAY, START)
    trained = record.states[-1]
    assert any(not torch.allclose(expected[key].float(), trained[key], atol=1e-4) for key in expected)

    last = torch.load(run_dir / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    assert not torch.isnan(last["state_dict"]["task.unknown_threshold"])  # fitted on validation, not averaged
    # The test after fit loaded the best checkpoint (epoch 1's is last.ckpt, epoch 0's ended at step 3): the model
    # after fit is the EMA of the weights up to that checkpoint's step.
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)
    expected_best = by_hand_ema(record.states[: best["global_step"]], DECAY, START)
    for key, value in expected.items():
        torch.testing.assert_close(last["state_dict"][key].double(), value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(last["current_model_state"][key], trained[key], rtol=0, atol=0, msg=key)
        after_fit = cli.model.state_dict()[key].double()
        torch.testing.assert_close(after_fit, expected_best[key], rtol=1e-5, atol=1e-6, msg=key)

    # The test after fit scored the best checkpoint's average, not its trained weights (Lightning's own
    # callback would load those back).
    datamodule = cli.datamodule
    images, labels = datamodule.test_set.to_arrays()
    inputs = prepared_by_hand(datamodule, images, image_size=None, view="resize")

    def test_loss(state: dict[str, torch.Tensor]) -> float:
        cli.model.load_state_dict(state)
        with torch.no_grad():
            return float(F.cross_entropy(cli.model.eval().network(inputs), labels))

    averaged, raw = test_loss(best["state_dict"]), test_loss(best["current_model_state"])
    assert abs(averaged - raw) > 1e-3
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(averaged, rel=1e-5)
    # So does a later `test` of that checkpoint, without --ema (as predict, export and serve read it).
    later = TransferLightningCLI(
        args=[
            "test",
            f"--config={CONFIG}",
            *small_run_args,
            f"--ckpt_path={cli.trainer.checkpoint_callback.best_model_path}",
        ]
    )
    assert float(later.trainer.callback_metrics["test/loss"]) == pytest.approx(averaged, rel=1e-5)


def test_resuming_keeps_the_average(small_run_args, run_dir):
    """Interrupted after epoch 0 and resumed, the run ends with the same average and weights as straight."""
    ema = ["--ema.enabled=true", f"--ema.decay={DECAY}", "--test_after_fit=false", "--trainer.max_epochs=3"]
    straight = fit(small_run_args, run_dir / "straight", *ema).model.state_dict()
    interrupt = {"class_path": "tests.model.test_resume.InterruptAtStep", "init_args": {"step": 3}}
    with pytest.raises(SystemExit):  # Lightning exits with status 1 after a KeyboardInterrupt
        main(["fit", *run_args(small_run_args, run_dir / "cut", *ema, f"--trainer.callbacks+={interrupt}")])
    resumed = fit(small_run_args, run_dir / "cut", *ema, "--ckpt_path=last")
    assert resumed.trainer.global_step == 9
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=0, msg=key)


def test_off_by_default_and_a_bad_decay_is_one_line(small_run_args, run_dir, capsys):
    fit(small_run_args, run_dir, "--trainer.max_epochs=1", "--test_after_fit=false")
    last = torch.load(run_dir / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=False)
    assert "current_model_state" not in last and "averaging_state" not in last
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIG}", *small_run_args, "--ema.enabled=true", "--ema.decay=1.5"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "ema.decay must be between 0 and 1" in error and "Traceback" not in error
