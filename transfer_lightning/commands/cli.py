"""The Lightning subcommands (fit, validate, test, predict): LightningCLI with this project's trainer defaults,
callbacks and links. The other subcommands are dispatched by :mod:`.main`."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning import checkpoints
from transfer_lightning.commands.subcommands import SUBCOMMANDS
from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference import PredictionsCSV
from transfer_lightning.interpretation import Interpretation
from transfer_lightning.logs import PlainProgress
from transfer_lightning.model import TransferClassifier
from transfer_lightning.training import (
    AtomicCheckpointIO,
    CheckpointOnInterrupt,
    DashboardLayout,
    FrozenFeatureCache,
    HparamsWithResults,
    TaskCheckpoint,
    TrainingSpeed,
    WeightEMA,
)
from transfer_lightning.training.best_checkpoint import AUTO

DESCRIPTION = (
    "Transfer learning of image classifiers (torchvision's, timm's and the Hugging Face Hub's) with PyTorch "
    "Lightning, e.g. "
    "python -m transfer_lightning fit --config configs/finetune_sgd.yaml. "
    "SUBCOMMAND --help lists a subcommand's options."
)

#: One line per subcommand for --help (Lightning would take the first, cut, line of each Trainer method's docstring).
SUBCOMMAND_HELP = {
    "fit": "Train, validate every epoch, keep the best and last checkpoints, then test the best.",
    "validate": "Evaluate a checkpoint (--ckpt_path) on the validation split.",
    "test": "Evaluate a checkpoint (--ckpt_path) on the test split, per class too.",
    "predict": "Write predictions.csv for new images (--data.predict_dir) or the test split, with --ckpt_path; "
    "with --model instead, from an exported file or a Hub folder.",
}
#: Subcommands that evaluate a trained checkpoint.
EVALUATING = ("validate", "test", "predict")


def program_name() -> str:
    """How the user started us: the console script, or ``python -m transfer_lightning``."""
    return "transfer-lightning" if Path(sys.argv[0]).name == "transfer-lightning" else "python -m transfer_lightning"


class ShortErrorParser(LightningArgumentParser):
    """A config error prints the error and a tip to run --help, not the usage of hundreds of options."""

    def print_usage(self, file=None) -> None:
        pass


class TransferLightningCLI(LightningCLI):
    """LightningCLI for :class:`TransferClassifier` on :class:`ImageFolderDataModule`.

    Defaults: GPU when present (else CPU), 5 epochs, TensorBoard logs in ``lightning_logs/version_N``
    with the resolved ``config.yaml``, the best checkpoint by ``val/acc`` (multi-label: ``val/mAP``) plus
    ``last.ckpt``, the learning rate logged per epoch, and after ``fit`` the best checkpoint tested on the test set.
    """

    def __init__(self, args: ArgsType = None, **kwargs) -> None:
        #: The --ckpt_path checkpoint, read once by _parse_ckpt_path (None without one).
        self.checkpoint: dict | None = None
        super().__init__(
            TransferClassifier,
            ImageFolderDataModule,
            trainer_defaults={
                "max_epochs": 5,
                "logger": lazy_instance(
                    TensorBoardLogger, save_dir=".", name="lightning_logs", default_hp_metric=False
                ),
                # Always added, next to any --trainer.callbacks.
                "callbacks": [
                    TrainingSpeed(),
                    HparamsWithResults(),
                    DashboardLayout(),
                    CheckpointOnInterrupt(),
                    PlainProgress(),
                ],
                "plugins": lazy_instance(AtomicCheckpointIO),  # lazy: the saved config.yaml names it
            },
            parser_kwargs={"description": DESCRIPTION, "prog": program_name()},
            parser_class=ShortErrorParser,
            # The model builds its own optimizer and scheduler (model.optimizer, model.scheduler).
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    # The three private LightningCLI methods below have no public extension point in Lightning 2.6.6
    # (tests/commands/test_newcomer.py, test_inference.py and test_bad_input.py fail if Lightning stops calling them).

    def _set_seed(self) -> None:
        # LightningCLI seeds before instantiating anything; a seed numpy rejects is a config error too.
        try:
            super()._set_seed()
        except ValueError as error:
            raise UserInputError(f"seed_everything: {error}") from None

    def _parse_ckpt_path(self) -> None:
        """Take the model's hyperparameters from ``--ckpt_path``, as LightningCLI does, after checking it.

        ``validate``, ``test`` and ``predict`` need a checkpoint (without one they would score a random
        new head); a path that does not exist, or a file that is not a checkpoint of ours, is one clear
        line, not Lightning's traceback. ``fit --ckpt_path last`` is resolved in :meth:`before_fit`.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if subcommand in EVALUATING and not ckpt_path:
            raise UserInputError(
                f"{subcommand} scores a trained model: pass --ckpt_path lightning_logs/version_N/checkpoints/FILE.ckpt "
                "(without one, the new head would be random)."
            )
        if not ckpt_path or (subcommand == "fit" and ckpt_path == "last"):
            return
        self.checkpoint = checkpoints.read_checkpoint(ckpt_path)  # read once: predict takes data settings from it
        hparams = {subcommand: {"model": checkpoints.model_hparams(self.checkpoint)}}
        self.config = self.parser.parse_object(hparams, self.config)

    def before_instantiate_classes(self) -> None:
        # With a checkpoint file, LightningCLI takes the model's hyperparameters from it and the
        # checkpoint's weights replace the pretrained ones: skip loading those (no download, and the
        # weights file may not exist on this machine).
        config = self.config.get(self.subcommand, {})
        ckpt_path = config.get("ckpt_path")
        resuming_last = self.subcommand == "fit" and ckpt_path == "last"  # resolved to a file in before_fit
        if ckpt_path and (Path(ckpt_path).is_file() or resuming_last):
            config["model"]["weights"] = None
            if self.subcommand != "fit":  # evaluating a checkpoint tracks no best checkpoints: nothing is lost
                dirpath_changed = r"The dirpath has changed from .* won't be reloaded"
                warnings.filterwarnings("ignore", message=dirpath_changed, category=UserWarning)
        if self.subcommand == "predict" and config["data"]["predict_dir"]:
            # New images: class names, image size and normalisation come from the checkpoint, not the data.
            for key, value in checkpoints.data_settings(self.checkpoint).items():
                config["data"][key] = value

    def instantiate_classes(self) -> None:
        """Build data, model and trainer; a value they reject is a config error, not a crash. The data's task
        reached the model through a link; the backbone's preprocessing goes to the data here (the handshake), and
        the best checkpoint follows the model's task (val/acc, or val/mAP for several labels) unless set."""
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as error:
            if isinstance(error, UserInputError):
                raise
            raise UserInputError(f"Invalid configuration: {error}") from None
        self.datamodule.use_weights(self.model.weights_preprocessing)
        if isinstance(self.trainer.checkpoint_callback, TaskCheckpoint):
            self.trainer.checkpoint_callback.follow(self.model.task)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        """Lightning's subcommands with one-line help texts of ours, and ours (:data:`.subcommands.SUBCOMMANDS`) too."""
        for subcommand, help_text in SUBCOMMAND_HELP.items():
            kwargs.setdefault(subcommand, {}).setdefault("description", help_text)
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for choice in subcommands._choices_actions:
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)
        # Listed for --help only: main() hands these to their modules before LightningCLI parses.
        for name, subcommand in SUBCOMMANDS.items():
            subcommands.add_subcommand(name, ShortErrorParser(description=subcommand.help), help=subcommand.help)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": AUTO,
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                # Metric names hold "/", so Lightning must not insert them into the file name.
                "checkpoint.filename": AUTO,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(FrozenFeatureCache, "feature_cache")
        parser.add_lightning_class_args(PredictionsCSV, "predictions")
        parser.add_lightning_class_args(Interpretation, "interpretation")
        parser.add_lightning_class_args(WeightEMA, "ema")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.task", "model.data_task", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit only: test the best checkpoint (by val/acc, or val/mAP) on the test set when training ends.",
        )

    def before_fit(self) -> None:
        """Log the learning rate as often as the scheduler steps; resolve ``--ckpt_path last``: the newest
        ``last.ckpt`` of any earlier run under this logger's folder."""
        self.match_learning_rate_logging()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last" or self.trainer.logger is None:
            return
        candidates = sorted(Path(self.trainer.logger.root_dir).glob("*/checkpoints/last.ckpt"), key=os.path.getmtime)
        if not candidates:
            raise UserInputError(
                f"--ckpt_path last: no last.ckpt under {self.trainer.logger.root_dir}/*/checkpoints. "
                "Pass the path of a checkpoint instead."
            )
        checkpoints.read_checkpoint(candidates[-1])  # a damaged last.ckpt is one line here, not Lightning's traceback
        config["ckpt_path"] = str(candidates[-1])
        rank_zero_info(f"Resuming from {candidates[-1]}")

    def match_learning_rate_logging(self) -> None:
        """Log the learning rate per step when the scheduler steps per step (LearningRateMonitor's default here is
        per epoch)."""
        if self.model.hparams.scheduler_interval == "step":
            for callback in self.trainer.callbacks:
                if isinstance(callback, LearningRateMonitor) and callback.logging_interval == "epoch":
                    callback.logging_interval = "step"

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit or self.trainer.interrupted:
            return
        has_best = self.trainer.checkpoint_callback is not None and self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
