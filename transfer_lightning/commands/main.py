"""``python -m transfer_lightning SUBCOMMAND``: the one entry point. Lightning's subcommands go to
:class:`~transfer_lightning.commands.cli.TransferLightningCLI`, the others to their own modules."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from transfer_lightning.commands import predict_model
from transfer_lightning.commands.cli import TransferLightningCLI, program_name
from transfer_lightning.commands.subcommands import SUBCOMMANDS
from transfer_lightning.errors import UserInputError
from transfer_lightning.logs import silence_noise


def main(args: list[str] | None = None) -> None:
    """Run the CLI; a :class:`UserInputError` is printed as one line and exits with status 2.

    The subcommands of :data:`.subcommands.SUBCOMMANDS` are dispatched here: LightningCLI's are Trainer methods only.
    """
    argv = sys.argv[1:] if args is None else args
    silence_noise()
    try:
        if argv[:1] and argv[0].startswith("--print_config"):
            raise UserInputError(
                f"Put a subcommand first: {program_name()} fit --config configs/finetune_sgd.yaml --print_config"
            )
        if argv[:1] and argv[0] in SUBCOMMANDS:
            SUBCOMMANDS[argv[0]].run(argv[1:])
        elif argv[:1] == ["predict"] and predict_model.wants_model(argv[1:]):
            predict_model.main(argv[1:])  # an exported model or Hub folder; with --ckpt_path it is Lightning's
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
