"""The subcommands that are not Trainer methods, in one table: :mod:`.main` runs them by it and ``--help`` lists it
(:mod:`.cli`), so a subcommand cannot be runnable and missing from the help, or the other way round."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its line in ``--help`` and its entry point, ``module:function`` taking the arguments after
    the subcommand's name. The module is imported only when the subcommand runs (several need an extra)."""

    help: str
    entry: str

    def run(self, argv: list[str]) -> None:
        module, function = self.entry.split(":")
        getattr(importlib.import_module(module), function)(argv)


SUBCOMMANDS = {
    "report": Subcommand(
        "Table and plot of finished runs from their TensorBoard events: "
        "report [LOGDIR ...] [--plot FILE] [--html FILE].",
        "transfer_lightning.reporting.command:main",
    ),
    "export": Subcommand(
        "A model file checked against the checkpoint: export --ckpt_path CKPT --format onnx|pt2|hub --output FILE; "
        "onnx also as int8 (--quantize int8), hub as a timm model folder for the Hugging Face Hub.",
        "transfer_lightning.inference.command:main",
    ),
    "serve": Subcommand(
        "An HTTP endpoint and a page on LitServe (the [serve] extra): "
        "serve --ckpt_path CKPT | --model FILE [--port 8000].",
        "transfer_lightning.serving.server:main",
    ),
    "backbones": Subcommand(
        "The names --model.backbone takes: torchvision's and timm's models, hf-hub:ORG/NAME on the Hugging Face Hub, "
        "local-dir:PATH folders in the Hub's layout; which are cached here.",
        "transfer_lightning.commands.backbones:main",
    ),
    "audit": Subcommand(
        "Likely wrong labels, duplicates and train/test leaks, outliers of fit's data (the [audit] extra): "
        "audit --config CFG --output DIR.",
        "transfer_lightning.commands.audit:main",
    ),
    "lr_find": Subcommand(
        "Learning-rate range test on fit's config: lr_find --config CFG [--apply FILE] (plot in the run folder).",
        "transfer_lightning.commands.lr_find:main",
    ),
    "optimize": Subcommand(
        "A photo folder, label table or Parquet set written once as LitData chunks (the [stream] extra), locally or to "
        "s3://: optimize --data.data_dir DIR --data.image_size 224 --output OUT; then fit --data.streaming_dir OUT.",
        "transfer_lightning.commands.optimize:main",
    ),
    "sweep": Subcommand(
        "An Optuna study over fit's settings (the [tune] extra): sweep --config CFG --sweep SPACE.yaml --trials N.",
        "transfer_lightning.commands.sweep:main",
    ),
}
