"""``python -m transfer_lightning lr_find --config ...``: Lightning's learning-rate range test on the configured
model and data, its plot with the suggestion marked, and with ``--apply`` a config that uses the suggestion."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from lightning.pytorch.tuner import Tuner  # noqa: E402

from transfer_lightning.errors import UserInputError  # noqa: E402
from transfer_lightning.files import atomic_path  # noqa: E402


def main(argv: list[str]) -> None:
    from transfer_lightning.cli import TransferLightningCLI, program_name

    parser = argparse.ArgumentParser(
        prog=f"{program_name()} lr_find",
        description="Train a few batches at exponentially rising learning rates (Lightning's Tuner.lr_find), "
        "print the suggested rate and plot loss against rate. Other options are fit's (--config, --model.*, ...).",
    )
    parser.add_argument("--min_lr", type=float, default=1e-6, help="first rate tried (default 1e-6)")
    parser.add_argument("--max_lr", type=float, default=1.0, help="last rate tried (default 1)")
    parser.add_argument("--num_training", type=int, default=100, help="batches, one rate each (default 100)")
    parser.add_argument("--apply", type=Path, default=None, metavar="FILE", help="write the config with the rate")
    args, rest = parser.parse_known_args(argv)
    cli = TransferLightningCLI(args=rest, run=False)
    finder = Tuner(cli.trainer).lr_find(
        cli.model,
        datamodule=cli.datamodule,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        num_training=args.num_training,
        update_attr=False,
    )
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise UserInputError("lr_find found no rate: the loss did not fall. Try a wider --min_lr/--max_lr range.")
    figure = finder.plot(suggest=True)
    path = Path(cli.trainer.log_dir or ".") / "lr_find.png"
    with atomic_path(path) as partial:
        figure.savefig(partial, format="png", dpi=90)
    plt.close(figure)
    print(f"Suggested learning rate: {suggestion:.3g} (loss against rate: {path})")
    if args.apply is not None:
        config = cli.config.clone()
        config.model.optimizer.init_args.lr = suggestion
        with atomic_path(args.apply) as partial:
            partial.write_text(cli.parser.dump(config, skip_none=False))
        print(f"Config with that rate: {args.apply} (run it with fit --config {args.apply})")
