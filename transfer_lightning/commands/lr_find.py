"""``python -m transfer_lightning lr_find --config ...``: Lightning's learning-rate range test on the configured
model and data, its plot with the suggestion marked, and with ``--apply`` a config that uses the suggestion."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as pl
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateFinder  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from transfer_lightning.commands.cli import TransferLightningCLI, program_name  # noqa: E402
from transfer_lightning.errors import UserInputError  # noqa: E402
from transfer_lightning.files import atomic_path  # noqa: E402

#: Fewest rates that give a suggestion: the first 10 and the last one are skipped.
MIN_RATES = 20
#: Weight of the past in the loss's moving average (Lightning's and fastai's).
SMOOTHING = 0.98


class RangeTest(LearningRateFinder):
    """Lightning's ``LearningRateFinder``, run once at the start of the first training epoch, then ``fit`` stops.

    Not at ``on_fit_start`` as Lightning's ``Tuner.lr_find`` does: by the first epoch the other callbacks have
    set the run up (the frozen-feature cache has swapped in the stored features, so a frozen head's sweep
    skips the backbone). Lightning's sweep gives every parameter group the same rate, so with gradual
    unfreezing it ends before ``unfreeze_at_epoch``: it finds the head's rate while the backbone is frozen,
    and the backbone gets that rate times ``backbone_lr_scale`` after unfreezing, as in ``fit``.

    Lightning's curve starts its moving average at zero with an off-by-one bias correction, so it rises
    over the first steps whatever the rate (Lightning issue 14167); :func:`raw_losses` undoes it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._done = False
        #: trainer.global_step when the sweep started (Lightning's bias correction counts from it).
        self.first_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:  # the sweep's own epochs
            return
        self._done = True
        unfreeze_at = getattr(pl_module.hparams, "unfreeze_at_epoch", None) if hasattr(pl_module, "hparams") else None
        if unfreeze_at is not None:
            frozen_steps = trainer.num_training_batches * unfreeze_at
            if frozen_steps < MIN_RATES:
                raise UserInputError(
                    f"lr_find with unfreeze_at_epoch {unfreeze_at}: only {frozen_steps} batches before the backbone "
                    f"is unfrozen, and a suggestion needs {MIN_RATES}. Use a smaller data.batch_size or a later "
                    "unfreeze_at_epoch for the sweep."
                )
            if frozen_steps < self._num_training_steps:  # set by LearningRateFinder.__init__, read by lr_find
                rank_zero_info(
                    f"lr_find: {frozen_steps} rates instead of {self._num_training_steps}, the batches before "
                    f"unfreeze_at_epoch {unfreeze_at} (the sweep gives every parameter group one rate)."
                )
                self._num_training_steps = frozen_steps
        self.first_step = trainer.global_step
        self.lr_find(trainer, pl_module)  # Lightning runs the sweep with its own callback only
        trainer.should_stop = True


def raw_losses(recorded: list[float], first_step: int, beta: float = SMOOTHING) -> list[float]:
    """The training losses of Lightning's sweep, from the curve it records: after its ``k``-th step it stores
    ``a_k / (1 - beta ** (first_step + k + 2))`` with ``a_k = beta * a_(k-1) + (1 - beta) * loss_k`` and
    ``a_(-1) = 0`` (``lightning.pytorch.tuner.lr_finder._LRCallback``); a step without a loss is NaN there."""
    average, losses = 0.0, []
    for k, value in enumerate(recorded):
        if not math.isfinite(value):
            losses.append(math.nan)
            continue
        current = value * (1 - beta ** (first_step + k + 2))
        losses.append((current - beta * average) / (1 - beta))
        average = current
    return losses


def smoothed(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction from the first step (fastai's ``SmoothenValue``);
    NaN steps are left out of it, and stay NaN."""
    average, step, out = 0.0, 0, []
    for loss in losses:
        if not math.isfinite(loss):
            out.append(math.nan)
            continue
        step += 1
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**step))
    return out


def suggest(rates: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1) -> int | None:
    """Index of the steepest fall of the loss against log(rate), the first ``skip_begin`` and last ``skip_end``
    steps left out. Against log(rate), as the rates are spaced: Lightning's suggestion takes the gradient
    against the rate itself, which favours the tiny steps at the small rates."""
    kept = [(i, math.log(r), v) for i, (r, v) in enumerate(zip(rates, losses, strict=True))][skip_begin:-skip_end]
    kept = [(i, x, v) for i, x, v in kept if math.isfinite(v)]
    if len(kept) < 2:
        return None
    indices, x, values = zip(*kept, strict=True)
    gradients = torch.gradient(torch.tensor(values), spacing=[torch.tensor(x)])[0]
    return indices[int(torch.argmin(gradients))]


def plot(rates: list[float], losses: list[float], best: int) -> Figure:
    figure, axis = plt.subplots(figsize=(7, 4.5), layout="constrained")
    axis.plot(rates, losses)
    axis.plot(rates[best], losses[best], "o", color="red", markersize=9)
    axis.set_xscale("log")
    axis.set_xlabel("learning rate")
    axis.set_ylabel(f"training loss (moving average, beta {SMOOTHING})")
    axis.set_title(f"loss against learning rate; suggested {rates[best]:.3g} (red: steepest fall)")
    axis.grid(alpha=0.3)
    return figure


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog=f"{program_name()} lr_find",
        description="Train a few batches at exponentially rising learning rates (Lightning's learning-rate "
        "finder), print the suggested rate and plot loss against rate in the run folder. Every other option is "
        "fit's (--config, --model.*, --data.*, --trainer.*).",
    )
    parser.add_argument("--min_lr", type=float, default=1e-6, help="the first rate tried (default 1e-6)")
    parser.add_argument("--max_lr", type=float, default=1.0, help="the last rate tried (default 1)")
    parser.add_argument("--num_training", type=int, default=100, help="batches, one rate each (default 100)")
    parser.add_argument(
        "--early_stop_threshold",
        type=lambda text: None if text.lower() in ("none", "null") else float(text),
        default=4.0,
        help="stop when the loss exceeds this times the best so far (default 4, Lightning's); none: try every rate",
    )
    parser.add_argument("--apply", type=Path, default=None, metavar="FILE", help="also write the config with the rate")
    args, rest = parser.parse_known_args(argv)
    if not 0 < args.min_lr < args.max_lr or args.num_training < MIN_RATES:
        raise UserInputError(f"lr_find needs 0 < --min_lr < --max_lr and --num_training of at least {MIN_RATES}.")
    cli = TransferLightningCLI(args=rest, run=False)
    if cli.model.hparams.head_solver == "lbfgs":
        raise UserInputError(
            "lr_find sweeps a learning rate, but head_solver lbfgs has none (its line search sets each step): "
            "run lr_find with head_solver gradient."
        )
    if cli.model.hparams.unfreeze_at_epoch == 0:
        raise UserInputError(
            "lr_find with unfreeze_at_epoch 0: the backbone trains at once, at backbone_lr_scale times the head's "
            "rate, but the sweep gives both one rate. Run it with unfreeze_at_epoch 1 or more (the head's rate), "
            "or without gradual unfreezing."
        )
    range_test = RangeTest(
        args.min_lr, args.max_lr, args.num_training, early_stop_threshold=args.early_stop_threshold, update_attr=False
    )
    cli.trainer.callbacks.append(range_test)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finder = range_test.optimal_lr
    rates = finder.results["lr"] if finder is not None else []
    losses = smoothed(raw_losses(finder.results["loss"], range_test.first_step)) if rates else []
    best = suggest(rates, losses) if rates else None
    if best is None:
        raise UserInputError("lr_find found no rate: the loss never fell. Try a wider --min_lr / --max_lr range.")
    suggestion = rates[best]
    figure = plot(rates[: len(losses)], losses, best)
    path = Path(cli.trainer.log_dir or ".") / "lr_find.png"
    with atomic_path(path) as partial:
        figure.savefig(partial, format="png", dpi=90)
    plt.close(figure)
    print(f"Suggested learning rate: {suggestion:.3g} (loss against rate: {path})")
    lightning_own = finder.suggestion()  # on its uncorrected curve, against the rate: for comparison
    if lightning_own is not None:
        rank_zero_info(f"Lightning's own suggestion on the same sweep: {lightning_own:.3g}")
    if args.apply is not None:
        config = cli.config.clone()
        config.model.optimizer.init_args.lr = suggestion
        with atomic_path(args.apply) as partial:
            partial.write_text(cli.parser.dump(config, skip_none=False))
        print(f"The config with that rate: {args.apply} (fit --config {args.apply})")
