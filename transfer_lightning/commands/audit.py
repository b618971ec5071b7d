"""``python -m transfer_lightning audit --config CFG --output DIR``: every image of every split of fit's data, judged
on the frozen features of the config's backbone (computed through the frozen-feature cache, so a frozen ``fit``
after it reuses them): likely wrong labels, duplicates and train/test leaks, outliers (:mod:`transfer_lightning.audit`).
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.audit.findings import AuditedImages, Duplicate, Findings
from transfer_lightning.audit.labels import check_folds, find_label_issues, out_of_sample_probabilities
from transfer_lightning.audit.neighbours import (
    NearThresholds,
    centre_,
    exact_duplicates,
    far_out,
    near_pairs,
    normalise_,
    outlier_scores,
    pixel_signatures,
)
from transfer_lightning.audit.page import page
from transfer_lightning.commands.cli import TransferLightningCLI, program_name
from transfer_lightning.data import ImageFolderDataModule, ImageTensorDataset
from transfer_lightning.data.edits import image_name
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.training import FrozenFeatureCache

#: Cosine similarities of centred frozen features, of thumbnails, and of both at once, at or above which two images
#: are near duplicates (measured on planted copies in CIFAR-10: docs/guides/audit.md).
NEAR_FEATURES = 0.9
NEAR_PIXELS = 0.95
NEAR_BOTH = 0.75
#: Neighbours whose mean similarity scores an outlier.
NEIGHBOURS = 5


def audited_splits(data: ImageFolderDataModule) -> list[tuple[str, ImageTensorDataset]]:
    """(split name, images) of each split once: a split that stands in for another (no test pool) is not repeated."""
    splits, seen = [], set()
    for name in ("train", "val", "test"):
        images = getattr(data, f"{name}_set")
        if images is not None and id(images) not in seen:
            splits.append((name, images))
            seen.add(id(images))
    return splits


def stored_pixels(audited: list[tuple[str, ImageTensorDataset]]) -> Callable[[list[int]], Tensor]:
    """The uint8 images (N, 3, H, W) at positions of the audit's order (its splits one after the other)."""
    ends = torch.tensor([len(images) for _, images in audited]).cumsum(0)

    def pixels(indices: list[int]) -> Tensor:
        if not indices:
            return torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        which = torch.searchsorted(ends, torch.tensor(indices), right=True).tolist()
        starts = [0, *ends.tolist()]
        return torch.stack([audited[w][1][index - starts[w]][0] for w, index in zip(which, indices, strict=True)])

    return pixels


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog=f"{program_name()} audit",
        description="Likely wrong labels, duplicates and leaks across splits, and outliers of fit's data (every image "
        "of every split), on the frozen features of the configured backbone. Every other option is fit's "
        "(--config, --data.*, --model.backbone, --feature_cache.*). Needs the audit extra (cleanlab).",
    )
    parser.add_argument("--output", type=Path, required=True, help="the folder for the CSV files")
    parser.add_argument("--folds", type=int, default=5, help="linear probes, each judging the images it did not see")
    parser.add_argument(
        "--near", type=float, default=NEAR_FEATURES, help="features' cosine similarity of near duplicates"
    )
    parser.add_argument(
        "--near_pixels", type=float, default=NEAR_PIXELS, help="16x16 thumbnails' cosine similarity of near duplicates"
    )
    parser.add_argument(
        "--near_both", type=float, default=NEAR_BOTH, help="both similarities at once, of near duplicates"
    )
    parser.add_argument("--neighbours", type=int, default=NEIGHBOURS, help="neighbours that score an outlier")
    args, rest = parser.parse_known_args(argv)
    if importlib.util.find_spec("cleanlab") is None:
        raise UserInputError("audit needs cleanlab: install the audit extra (pip install -e '.[audit]').")
    if not all(0 < value <= 1 for value in (args.near, args.near_pixels, args.near_both)) or args.neighbours < 1:
        raise UserInputError(
            f"--near, --near_pixels and --near_both are cosine similarities in (0, 1], --neighbours at least 1; got "
            f"{args.near}, {args.near_pixels}, {args.near_both}, {args.neighbours}."
        )
    cli = TransferLightningCLI(args=rest, run=False)
    data, model, trainer = cli.datamodule, cli.model, cli.trainer
    if data.streamed:
        raise UserInputError(
            "audit reads the images of a folder, label table, Parquet or CIFAR-10, not a stream: pass the "
            "--data.data_dir (or --data.labels_file, --data.parquet) the stream was optimized from."
        )
    if model.hparams.weights is None:
        raise UserInputError(
            "audit compares images by a pretrained backbone's features, but --model.weights is null (random "
            "weights): leave model.weights at DEFAULT, or name a weights file."
        )
    data.prepare_data()
    data.setup("fit")
    cache = next((c for c in trainer.callbacks if isinstance(c, FrozenFeatureCache)), None) or FrozenFeatureCache()
    model.eval()
    root = data.source.names_root
    audited = audited_splits(data)
    images = AuditedImages(
        [image_name(name, root) for _, split_images in audited for name in split_images.image_names()],
        [split for split, split_images in audited for _ in range(len(split_images))],
        torch.cat([split_images.labels for _, split_images in audited]),
        data.class_names,
    )
    check_folds(images.labels, images.class_names, args.folds)  # before the backbone's work
    features, start = None, 0  # filled split by split: a concatenation would hold every feature twice
    for split, split_images in audited:
        split_features = cache.features(model, data, split_images, split, trainer)[0].flatten(1).float()
        if features is None:
            features = torch.empty(len(images.names), split_features.shape[1])
        features[start : start + len(split_features)] = split_features
        start += len(split_features)
        del split_features
    cache.release_engine()
    multilabel = data.task == "multilabel"

    probabilities = out_of_sample_probabilities(features, images.labels, len(data.class_names), args.folds, multilabel)
    label_findings = find_label_issues(probabilities, images.labels, multilabel)
    scores = outlier_scores(normalise_(features), args.neighbours)
    deep = centre_(features)  # the same memory: the features are not needed as they were any more
    digests, thumbnails = pixel_signatures(batch for _, split in audited for batch, _ in split.batches(500))
    exact = exact_duplicates(digests)
    near = near_pairs(deep, thumbnails, NearThresholds(args.near, args.near_pixels, args.near_both))
    duplicates = [
        Duplicate(i, j, float(deep[i] @ deep[j]), float(thumbnails[i] @ thumbnails[j]), kind)
        for pairs, kind in ((exact, "exact"), (sorted(near - set(exact)), "near"))
        for i, j in pairs
    ]
    findings = Findings(images, label_findings, duplicates, scores, far_out(scores))
    written = findings.write(args.output)
    with atomic_path(args.output / "audit.html") as partial:
        partial.write_text(page(findings, stored_pixels(audited)), encoding="utf-8")
    written.append(args.output / "audit.html")
    print(findings.summary())
    rank_zero_info("Audit: " + ", ".join(str(path) for path in written))
