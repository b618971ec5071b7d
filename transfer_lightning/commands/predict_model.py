"""``python -m transfer_lightning predict --model MODEL --data.predict_dir DIR``: predictions.csv from a model
without its checkpoint: a folder of ``export --format hub`` or an exported ``.pt2``/``.onnx`` file.

With ``--ckpt_path`` instead, ``predict`` is Lightning's (:mod:`.cli`); this path reads the images as the
server does (the same decoding, crop and model), and writes the same columns as
:class:`~transfer_lightning.inference.PredictionsCSV`.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.listing import list_images
from transfer_lightning.data.store import DECODE_ERRORS
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.logs import progress_bar
from transfer_lightning.serving.requests import load_model


def wants_model(argv: list[str]) -> bool:
    """Whether a ``predict`` command line names ``--model`` (a file or folder), not LightningCLI's ``--model.*``."""
    return any(arg == "--model" or arg.startswith("--model=") for arg in argv)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transfer_lightning predict --model",
        description="predictions.csv for a folder of images (or one image) from an exported model: a folder of "
        "export --format hub, or a .pt2/.onnx file with its .json. With --ckpt_path, see predict --help.",
    )
    parser.add_argument("--model", required=True, help="a folder of export --format hub, or an exported .pt2/.onnx")
    parser.add_argument("--data.predict_dir", dest="predict_dir", required=True, help="images, at any depth, or one")
    parser.add_argument("--output", default="predictions.csv", help="the CSV to write (default: ./predictions.csv)")
    parser.add_argument("--predictions.top_k", dest="top_k", type=int, default=5, help="most probable classes listed")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise UserInputError("--predictions.top_k and --batch_size must be at least 1.")
    folder = Path(args.predict_dir).expanduser()
    if not folder.exists():
        raise UserInputError(f"--data.predict_dir {folder} does not exist: pass a folder of images or an image.")
    model = load_model(None, args.model, "cpu")
    files = [path for path, _ in list_images(folder, None)[0]]
    task, top_k = model.task, min(args.top_k, model.task.num_classes)
    skipped = []
    with atomic_path(args.output) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", *task.prediction_header(top_k)])
        for start in progress_bar(range(0, len(files), args.batch_size), desc="Predicting", unit="batch"):
            names, images = [], []
            for path in files[start : start + args.batch_size]:
                try:
                    images.append(model.prepare(Path(path).read_bytes()))
                except DECODE_ERRORS:
                    skipped.append(path)
                    continue
                names.append(os.path.relpath(path, folder) if folder.is_dir() else str(folder))
            if images:
                for name, (row, score) in zip(names, model.run(torch.stack(images)).per_image(), strict=True):
                    writer.writerow([name, *task.prediction_cells(row, top_k, score)])
    rank_zero_info(f"Predictions of {len(files) - len(skipped)} images: {args.output}")
    if skipped:
        rank_zero_info(f"Skipped {len(skipped)} files that do not decode as images, e.g. {skipped[0]}.")
