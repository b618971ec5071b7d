"""lr_find: Lightning's learning-rate range test through the CLI, for plain, gradually unfrozen and frozen models."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from transfer_lightning.commands.lr_find import raw_losses, smoothed, suggest
from transfer_lightning.commands.main import main
from transfer_lightning.model import TransferClassifier

CASES = {
    "fine-tune": [],
    "gradual unfreezing": ["--model.freeze_backbone=true", "--model.unfreeze_at_epoch=1", "--data.batch_size=4"],
    "frozen head": ["--model.freeze_backbone=true", "--data.augment=false"],
    "frozen mlp head": ["--model.freeze_backbone=true", "--data.augment=false", "--model.head=mlp"],
}


@pytest.mark.parametrize("extra", CASES.values(), ids=CASES.keys())
def test_lr_find_suggests_a_rate_and_plots_it(run_dir, small_run_args, extra, capsys, monkeypatch):
    """A finite rate inside the range, its plot in the run folder; a frozen head sweeps on stored features
    (its training steps get pooled features, not images); gradual unfreezing sweeps only the frozen epochs."""
    inputs = []
    training_step = TransferClassifier.training_step

    def spy(self, batch, batch_idx):
        inputs.append((batch[0].ndim, self.frozen.backbone_frozen))
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(TransferClassifier, "training_step", spy)
    # Every rate is tried: Lightning's early stop depends on the last bits of the losses, which differ by CPU.
    main(["lr_find", *small_run_args, "--num_training=30", "--early_stop_threshold=none", *extra])
    rate = float(re.search(r"Suggested learning rate: (\S+)", capsys.readouterr().out).group(1))
    assert math.isfinite(rate) and 1e-6 <= rate <= 1
    assert len(list(run_dir.glob("lightning_logs/version_*/lr_find.png"))) == 1
    if "--data.augment=false" in extra:
        assert {ndim for ndim, _ in inputs} == {2}  # features, not images
    if "--model.unfreeze_at_epoch=1" in extra:
        assert len(inputs) == 25 and all(frozen for _, frozen in inputs)  # the 25 batches of epoch 0 only
    else:
        assert len(inputs) == 30


def test_lr_find_apply_writes_a_config_that_fits(run_dir, small_run_args, capsys):
    main(["lr_find", *small_run_args, "--num_training=20", "--apply=tuned.yaml"])
    rate = float(re.search(r"Suggested learning rate: (\S+)", capsys.readouterr().out).group(1))
    written = yaml.safe_load((run_dir / "tuned.yaml").read_text())["model"]["optimizer"]["init_args"]["lr"]
    assert f"{written:.3g}" == f"{rate:.3g}"
    main(["fit", "--config=tuned.yaml", "--trainer.fast_dev_run=true"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.freeze_backbone=true", "--model.unfreeze_at_epoch=0"], "unfreeze_at_epoch 0"),
        (["--model.freeze_backbone=true", "--model.unfreeze_at_epoch=1"], "only 7 batches before"),
        (["--num_training=5"], "at least 20"),
        (["--model.freeze_backbone=true", "--model.head_solver=lbfgs"], "head_solver lbfgs has none"),
    ],
)
def test_lr_find_refuses_what_it_cannot_sweep(run_dir, small_run_args, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["lr_find", *small_run_args, *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_raw_losses_undo_lightnings_recording():
    """What Lightning's sweep callback records for known losses (its own code, driven by hand) gives those
    losses back; Lightning's curve itself starts at about half the first loss (issue 14167)."""
    from lightning.pytorch.tuner.lr_finder import _LRCallback

    losses = [2.3, 2.31, 2.28, 2.2, 2.0, 1.7, 1.5, 1.6, 2.5, 4.0]
    recorder = _LRCallback(num_training=len(losses), early_stop_threshold=None)
    for step, loss in enumerate(losses):
        strategy = SimpleNamespace(broadcast=lambda value: value)
        trainer = SimpleNamespace(
            fit_loop=SimpleNamespace(batch_idx=step), accumulate_grad_batches=1, global_step=step + 1,
            strategy=strategy, should_stop=False,
        )  # fmt: skip
        recorder.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
    assert recorder.losses[0] == pytest.approx(losses[0] * 0.02 / (1 - 0.98**2))  # 0.505 of the first loss
    assert raw_losses(recorder.losses, first_step=0) == pytest.approx(losses, abs=1e-6)  # float32 losses
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # corrected from the first step


def test_suggestion_is_the_steepest_fall_against_log_rate():
    """On rates spaced by factors of 10**0.1, the fall is steepest where it is per decade, not where the
    rates are closest: a loss falling by 0.01 per step at small rates and 0.2 per step later."""
    rates = [10 ** (-6 + 0.1 * i) for i in range(40)]
    losses = [2.3 - 0.01 * i if i < 25 else 2.06 - 0.2 * (i - 25) for i in range(40)]
    best = suggest(rates, losses)
    assert 25 <= best <= 38 and rates[best] > 1e-4
