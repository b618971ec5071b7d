"""How well a trained model tells images of no known class from its own classes' test images.

For each set of unknown images (``--unknown NAME=FOLDER``, any number): AUROC and the false-positive rate at 95% of
the known test images kept (FPR@95: the share of unknowns let through at the threshold that keeps 95% of the known
test images) of three scores, higher = less like any known class:

- the maximum softmax probability, negated (Hendrycks & Gimpel, 2017: the baseline), of the plain softmax;
- the energy score ``-logsumexp(logits)`` (Liu et al., 2020): the model's own unknown score;
- the distance to the k-th nearest training feature (cosine, on L2-normalised pooled features; Sun et al., 2022),
  for each ``--k``, against every image of the run's training split.

Then the model's own rule, the threshold chosen on validation at ``model.known_rate``: the share of known test
images it keeps and of each unknown set it rejects. The known images are the run's test split; the checkpoint's own
data settings give it and the training split (``--data_dir`` when they moved). Features are computed by onnxruntime
when the [export] extra is installed (as the frozen-feature cache does), else by torch::

    python benchmarks/unknowns.py --ckpt_path RUN/checkpoints/BEST.ckpt --unknown held-out=DIR --unknown photos=DIR
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer_lightning import checkpoints  # noqa: E402
from transfer_lightning.data.listing import list_images  # noqa: E402
from transfer_lightning.data.transforms import Preprocessing  # noqa: E402
from transfer_lightning.inference.export import load_classifier  # noqa: E402
from transfer_lightning.inference.run_images import open_run_images  # noqa: E402
from transfer_lightning.logs import progress_bar  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.network.onnx import OnnxFeatureExtractor, missing_onnx_packages  # noqa: E402
from transfer_lightning.serving.requests import load_model  # noqa: E402
from transfer_lightning.tasks.unknowns import energy_scores  # noqa: E402

#: The share of known images kept where the false-positive rate is read.
KEPT = 0.95


def features_of(model: TransferClassifier, preprocessing: Preprocessing, batches, total: int, what: str) -> Tensor:
    """Pooled features of uint8 batches at the caller's size, as the exported model prepares them."""
    extractor, chunks = None, []
    with torch.inference_mode():
        for images in progress_bar(batches, total=total, desc=f"Features of {what}", unit="batch"):
            inputs = preprocessing(images)
            if extractor is None:
                extractor = (
                    OnnxFeatureExtractor(model.network, model.parts.classifier_block, inputs)
                    if not missing_onnx_packages()
                    else model.classifier_inputs
                )
            chunks.append(extractor(inputs))
    return torch.cat(chunks)


def knn_distances(features: Tensor, bank: Tensor, k: int) -> Tensor:
    """(N,) 1 - cosine similarity to the k-th nearest of ``bank``'s (normalised) rows, in blocks of 1,000 images."""
    normalised = F.normalize(features, dim=1)
    return torch.cat([1 - (block @ bank.T).topk(k, dim=1).values[:, -1] for block in normalised.split(1000)])


def false_positive_rate(known: Tensor, unknown: Tensor, kept: float = KEPT) -> float:
    """The share of ``unknown`` scores at or below the score that keeps ``kept`` of the ``known`` ones."""
    threshold = known.kthvalue(math.ceil(kept * len(known))).values
    return float((unknown <= threshold).float().mean())


def auroc(known: Tensor, unknown: Tensor) -> float:
    """The probability that an unknown image scores above a known one (torchmetrics' binary AUROC)."""
    targets = torch.cat([torch.zeros(len(known)), torch.ones(len(unknown))]).long()
    return float(binary_auroc(torch.cat([known, unknown]).float(), targets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--unknown", action="append", required=True, help="NAME=FOLDER of images of no known class")
    parser.add_argument("--data_dir", default=None, help="the run's data, when it moved")
    parser.add_argument("--k", default="1,10,50", help="neighbours, comma-separated")
    parser.add_argument("--batch_size", type=int, default=100)
    args = parser.parse_args()

    model, preprocessing = load_classifier(args.ckpt_path)
    run = open_run_images(checkpoints.read_checkpoint(args.ckpt_path), preprocessing, data_dir=args.data_dir)
    if run.test is None:
        raise SystemExit("The run has no test split: its known images.")

    def split_features(dataset, what: str) -> Tensor:
        batches = (images for images, _ in run.batches(dataset, args.batch_size))
        return features_of(model, preprocessing, batches, math.ceil(len(dataset) / args.batch_size), what)

    served = load_model(args.ckpt_path, None, "cpu")  # decodes folders as predict --model and serve do
    sets = {"known (test split)": split_features(run.test, "the test split")}
    for named in args.unknown:
        name, folder = named.split("=", 1)
        files = [path for path, _ in list_images(Path(folder), None)[0]]
        prepared = [served.prepare(Path(path).read_bytes()) for path in files]
        batches = (torch.stack(prepared[i : i + args.batch_size]) for i in range(0, len(prepared), args.batch_size))
        sets[name] = features_of(model, preprocessing, batches, math.ceil(len(prepared) / args.batch_size), name)
    bank = F.normalize(split_features(run.train, "the training split"), dim=1)

    scores: dict[str, dict[str, Tensor]] = {}
    with torch.inference_mode():
        for name, features in sets.items():
            logits = model.classifier_block(features)
            scores[name] = {"max softmax probability": -logits.softmax(dim=-1).max(dim=-1).values}
            scores[name]["energy (the model's rule)"] = energy_scores(logits)
            for k in (int(k) for k in args.k.split(",")):
                scores[name][f"kNN distance, k={k}"] = knn_distances(features, bank, k)

    known_name, *unknown_names = scores
    known = scores[known_name]
    print(f"known: {len(sets[known_name])} test images of {len(model.class_names)} classes; training bank: {len(bank)}")
    header = "| score | " + " | ".join(f"{n} ({len(sets[n])}) AUROC | FPR@95" for n in unknown_names) + " |"
    print(header)
    print("|---|" + "---:|---:|" * len(unknown_names))
    for score in known:
        pairs = [(known[score], scores[n][score]) for n in unknown_names]
        cells = [f"{100 * auroc(*pair):.1f}% | {100 * false_positive_rate(*pair):.1f}%" for pair in pairs]
        print(f"| {score} | " + " | ".join(cells) + " |")

    threshold = float(model.task.unknown_threshold)
    energy = "energy (the model's rule)"
    kept = float((known[energy] <= threshold).float().mean())
    print(
        f"\nThe model's threshold {threshold:.4f} (chosen on validation to keep {model.task.known_rate:.0%}): keeps "
        f"{100 * kept:.1f}% of the known test images; rejects "
        + ", ".join(f"{100 * float((scores[n][energy] > threshold).float().mean()):.1f}% of {n}" for n in unknown_names)
    )


if __name__ == "__main__":
    main()
