"""``python -m transfer_lightning SUBCOMMAND``: the one entry point. Lightning's subcommands go to
:class:`~transfer_lightning.commands.cli.TransferLightningCLI`, the others to their own modules."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from transfer_lightning.commands import backbones, lr_find, optimize, predict_model, sweep
from transfer_lightning.commands.cli import TransferLightningCLI, program_name
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference import command as export_command
from transfer_lightning.logs import silence_noise
from transfer_lightning.reporting import command as reporting_command
from transfer_lightning.serving import server


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a :class:`UserInputError` is printed as one line and exits with status 2.

    ``report``, ``export``, ``serve``, ``backbones``, ``lr_find``, ``optimize`` and ``sweep`` are dispatched here:
    LightningCLI's subcommands are Trainer methods only.
    """
    argv = sys.argv[1:] if args is None else args
    silence_noise()
    try:
        if argv[:1] and argv[0].startswith("--print_config"):
            raise UserInputError(
                f"Put a subcommand first: {program_name()} fit --config configs/finetune_sgd.yaml --print_config"
            )
        if argv[:1] == ["report"]:
            reporting_command.main(argv[1:])
        elif argv[:1] == ["export"]:
            export_command.main(argv[1:])
        elif argv[:1] == ["predict"] and predict_model.wants_model(argv[1:]):
            predict_model.main(argv[1:])  # an exported model or Hub folder; with --ckpt_path it is Lightning's
        elif argv[:1] == ["backbones"]:
            backbones.main(argv[1:])
        elif argv[:1] == ["lr_find"]:
            lr_find.main(argv[1:])
        elif argv[:1] == ["optimize"]:
            optimize.main(argv[1:], f"{program_name()} optimize")  # imports LitData (the [stream] extra) only then
        elif argv[:1] == ["sweep"]:
            sweep.main(argv[1:])  # imports Optuna (the [tune] extra) only then
        elif argv[:1] == ["serve"]:
            server.main(argv[1:])  # imports LitServe (the [serve] extra) only then
        else:
            TransferLightningCLI(args=args)
    except (UserInputError, MisconfigurationException) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        # A disk that fills where no writer checks first (a checkpoint, predictions.csv, an export): the writers
        # use temporary names, so nothing half-written is left under a final name.
        where = Path(error.filename).parent if error.filename else "a file"
        print(f"error: the disk filled while writing into {where}: free space, or write elsewhere.", file=sys.stderr)
        sys.exit(2)
