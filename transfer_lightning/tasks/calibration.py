"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks"): one temperature, fitted on
the validation split, divides the logits so that the softmax's confidence matches how often it is right. The top
class, and so every accuracy, is unchanged."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

#: Validation images below which no temperature is fitted (it stays 1.0): too few to say how confident to be.
MIN_IMAGES = 50
#: Bins of the expected calibration error (torchmetrics' default, and the literature's).
ECE_BINS = 15


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature that minimises the cross-entropy of ``logits / T`` against ``labels`` (T > 0, fitted as
    log T by L-BFGS in float64: one parameter, a smooth convex objective)."""
    logits, labels = logits.detach().double().cpu(), labels.cpu()
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_temperature.detach().exp())


def calibration_error(probabilities: Tensor, labels: Tensor) -> float:
    """Expected calibration error: the mean gap between confidence and accuracy over :data:`ECE_BINS` bins of
    confidence, weighted by the images in each (torchmetrics' ``multiclass_calibration_error``, L1)."""
    return float(multiclass_calibration_error(probabilities.float(), labels, probabilities.shape[-1], n_bins=ECE_BINS))


def multilabel_calibration_error(probabilities: Tensor, targets: Tensor) -> float:
    """The calibration error of each label's sigmoid (torchmetrics' ``binary_calibration_error``, 15 bins), averaged
    over the labels: several labels per image have no temperature, but their probabilities can still be honest."""
    errors = [
        binary_calibration_error(probabilities[:, k].float().contiguous(), targets[:, k].contiguous(), n_bins=ECE_BINS)
        for k in range(probabilities.shape[-1])
    ]
    return float(torch.stack(errors).mean())


def reliability(probabilities: Tensor, labels: Tensor) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, images) of each non-empty confidence bin, as a reliability diagram plots them."""
    confidence, predicted = probabilities.float().max(dim=-1)
    correct = (predicted == labels).float()
    bins = (confidence * ECE_BINS).ceil().clamp(1, ECE_BINS).long() - 1
    count = torch.bincount(bins, minlength=ECE_BINS)
    mean_confidence = torch.bincount(bins, weights=confidence, minlength=ECE_BINS) / count.clamp(min=1)
    accuracy = torch.bincount(bins, weights=correct, minlength=ECE_BINS) / count.clamp(min=1)
    return [(float(c), float(a), int(n)) for c, a, n in zip(mean_confidence, accuracy, count, strict=True) if n > 0]


def reliability_diagram(curves: dict[str, list[tuple[float, float, int]]]) -> Figure:
    """Accuracy against confidence per bin, one line per curve (e.g. before and after the temperature); a
    calibrated model lies on the diagonal, an over-confident one below it."""
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    for name, points in curves.items():
        axes.plot([c for c, _, _ in points], [a for _, a, _ in points], marker="o", label=name)
    axes.set(xlabel="confidence (probability of the top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    axes.set_title(f"Reliability ({ECE_BINS} bins)")
    axes.legend(loc="upper left")
    return figure
