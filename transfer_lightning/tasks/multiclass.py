"""One class per image: softmax (divided by a temperature fitted on validation), cross-entropy, accuracy, "none of
these" above a threshold of the unknown score chosen on validation, and the test's
:class:`~.classification_report.ClassificationReport`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import CatMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from transfer_lightning.tasks.base import Task, TaskMetrics
from transfer_lightning.tasks.calibration import MIN_IMAGES, calibration_error, fit_temperature, reliability
from transfer_lightning.tasks.classification_report import ClassificationMetrics, ClassificationReport
from transfer_lightning.tasks.unknowns import UNKNOWN, energy_scores, known_threshold, rejected

#: The share of validation images that the threshold of "none of these" keeps, by default.
KNOWN_RATE = 0.95


class MulticlassMetrics(TaskMetrics):
    """Accuracy in training and validation; the :class:`ClassificationMetrics` of the test."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_metrics = ClassificationMetrics(num_classes)
        # The logits of a whole split, for the temperature and the calibration error (gathered under DDP).
        self.logits = nn.ModuleDict({stage: CatMetric() for stage in ("val", "test")})
        self.labels = nn.ModuleDict({stage: CatMetric() for stage in ("val", "test")})

    def training_update(self, logits: Tensor, labels: Tensor) -> dict[str, Metric]:
        self.train_acc(logits, labels)
        return {"train/acc": self.train_acc}

    def update(self, stage: Literal["val", "test"], logits: Tensor, labels: Tensor) -> dict[str, Metric]:
        self.logits[stage].update(logits.float())
        self.labels[stage].update(labels)
        if stage == "test":
            self.test_metrics.update(logits, labels)  # logged from the report, at the test's end
            return {}
        self.val_acc.update(logits, labels)
        return {"val/acc": self.val_acc}

    def split(self, stage: Literal["val", "test"]) -> tuple[Tensor, Tensor]:
        """The logits and labels of the whole split, read once (the collections are reset)."""
        logits, labels = self.logits[stage].compute(), self.labels[stage].compute().long()
        self.logits[stage].reset()
        self.labels[stage].reset()
        return logits, labels

    def validation_end(self, task: MulticlassTask, sanity_checking: bool) -> dict[str, float]:
        """Fit the task's temperature on this validation (accuracy is logged per batch by Lightning)."""
        logits, labels = self.split("val")
        if sanity_checking or len(labels) == 0:
            return {}
        before = calibration_error(logits.softmax(dim=-1), labels)
        task.fit_on_validation(logits, labels)
        after = calibration_error(task.probabilities(logits), labels)
        values = {"val/ece_uncalibrated": before, "val/ece": after, "val/temperature": float(task.temperature)}
        if task.has_unknown_threshold:
            values["val/unknown_threshold"] = float(task.unknown_threshold)
        return values

    def test_end(self, task: MulticlassTask) -> ClassificationReport:
        report = self.test_metrics.compute(task.class_names)
        self.test_metrics.reset()
        logits, labels = self.split("test")
        if len(labels) == 0:
            return report
        before, after = logits.softmax(dim=-1), task.probabilities(logits)
        temperature = float(task.temperature)
        has_threshold = task.has_unknown_threshold
        return dataclasses.replace(
            report,
            known_kept=1 - float(task.unknown(task.unknown_scores(logits)).float().mean()) if has_threshold else None,
            known_rate=task.known_rate if has_threshold else None,
            calibration_error_before=calibration_error(before, labels),
            calibration_error=calibration_error(after, labels),
            temperature=temperature,
            reliability={
                "softmax": reliability(before, labels),
                f"temperature {temperature:.2f}": reliability(after, labels),
            },
        )


class MulticlassTask(Task):
    """One class per image: a softmax over the classes, cross-entropy, accuracy."""

    name = "multiclass"
    score = "acc"
    score_title = "accuracy"
    single_label = True
    true_column = "true_class"
    answers_unknown = True

    def __init__(self, class_names: list[str], calibrate: bool = True, known_rate: float | None = KNOWN_RATE) -> None:
        super().__init__(class_names)
        #: Whether validation fits :attr:`temperature` (``model.calibrate``).
        self.calibrate = calibrate
        #: The share of validation images kept as known by :attr:`unknown_threshold` (``model.known_rate``; None: none).
        self.known_rate = known_rate
        #: Divides the logits before the softmax: fitted on validation, saved in checkpoints and exported files.
        self.register_buffer("temperature", torch.ones(()))
        #: The :func:`.unknowns.energy_scores` above which an image is of no known class; infinite: none chosen.
        self.register_buffer("unknown_threshold", torch.tensor(math.inf))
        self._said_too_few = False

    def fit_on_validation(self, logits: Tensor, labels: Tensor) -> None:
        """Fit :attr:`temperature` and choose :attr:`unknown_threshold` on a validation split's logits; too small a
        split keeps both as they are (1.0, and no rule) and says so once."""
        if len(labels) < MIN_IMAGES:
            if not self._said_too_few and (self.calibrate or self.known_rate is not None):
                rank_zero_info(
                    f"Calibration: {len(labels)} validation images are too few to fit a temperature or choose the "
                    f'threshold of "none of these" (at least {MIN_IMAGES}); the probabilities are the softmax\'s '
                    "as they are (temperature 1), and every image is given a known class."
                )
                self._said_too_few = True
            return
        if self.calibrate:
            self.temperature.fill_(fit_temperature(logits, labels))
        if self.known_rate is not None:
            self.unknown_threshold.fill_(known_threshold(energy_scores(logits), self.known_rate))

    def probabilities(self, logits: Tensor) -> Tensor:
        return (logits / self.temperature).softmax(dim=-1)

    @property
    def has_unknown_threshold(self) -> bool:
        """Whether a threshold was chosen (not with ``known_rate`` null, a small validation split, or older files)."""
        return math.isfinite(float(self.unknown_threshold))

    def unknown_scores(self, logits: Tensor) -> Tensor:
        return energy_scores(logits)

    def unknown(self, scores: Tensor) -> Tensor:
        """(N,) bool: the images of no known class by :attr:`unknown_threshold` (none without a threshold)."""
        return rejected(scores, self.unknown_threshold)

    def flip_average(self, logits: Tensor, mirrored: Tensor) -> Tensor:
        """The log of the mean of the two softmaxes (in log space, so nothing underflows), shifted by the mean of
        the two logsumexps: the shift leaves every softmax (and so every loss and accuracy) as it is, and makes the
        energy of the result the mean of the two images' energies, for "none of these"."""
        both = torch.stack([logits.log_softmax(dim=-1), mirrored.log_softmax(dim=-1)])
        energy = (torch.logsumexp(logits, dim=-1) + torch.logsumexp(mirrored, dim=-1)) / 2
        return torch.logsumexp(both, dim=0) - math.log(2) + energy[..., None]

    def training_loss(
        self, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, class_weights: Tensor | None = None
    ) -> Tensor:
        return F.cross_entropy(logits, labels, weight=class_weights, label_smoothing=label_smoothing)

    def evaluation_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    def chosen(self, probabilities: Tensor) -> Tensor:
        return F.one_hot(probabilities.argmax(dim=-1), self.num_classes)

    def score_of(self, probabilities: Tensor, labels: Tensor) -> float:
        return float((probabilities.argmax(dim=-1) == labels).float().mean())

    def explained_class(self, labels: Tensor, probabilities: Tensor) -> Tensor:
        return labels

    def metrics(self) -> MulticlassMetrics:
        return MulticlassMetrics(self.num_classes)

    def describe_output(self) -> dict[str, Any]:
        threshold = float(self.unknown_threshold)
        return {
            "activation": "softmax of logits / temperature (multiclass)",
            "temperature": float(self.temperature),
            "unknown_score": "-logsumexp(logits): the energy of the logits, before the temperature",
            "unknown_threshold": threshold if self.has_unknown_threshold else None,
            "known_rate": self.known_rate,
        }

    def load_output_description(self, output: dict[str, Any]) -> None:
        # Files exported before calibration and "none of these": temperature 1, no threshold.
        self.temperature.fill_(output.get("temperature", 1.0))
        threshold = output.get("unknown_threshold")
        self.unknown_threshold.fill_(math.inf if threshold is None else threshold)

    def prediction_header(self, top_k: int) -> list[str]:
        ranked = [f"top{rank}_{what}" for rank in range(1, top_k + 1) for what in ("class", "probability")]
        return ["predicted_class", "probability", "unknown_score", "unknown", *ranked]

    def prediction_cells(self, probabilities: Tensor, top_k: int, unknown_score: float | None = None) -> list[str]:
        """The predicted class (``unknown`` for an image of no known class) and its probability (the closest
        class's), the unknown score (empty from files exported without one) and whether it is above the
        threshold, then the ``top_k``."""
        top_probabilities, top_classes = probabilities.topk(top_k)
        ranked = [
            cell
            for c, p in zip(top_classes.tolist(), top_probabilities.tolist(), strict=True)
            for cell in (self.class_names[c], f"{p:.6f}")
        ]
        unknown = self._is_unknown(unknown_score)
        score = "" if unknown_score is None else f"{unknown_score:.6f}"
        return [UNKNOWN if unknown else ranked[0], ranked[1], score, str(unknown).lower(), *ranked]

    def answer(self, probabilities: Tensor, top_k: int, unknown_score: float | None = None) -> dict[str, Any]:
        """The base answer, with the ``unknown_score`` and ``unknown``; an image of no known class is answered
        ``"class": "unknown"`` with its ``closest`` class (and that class's probability)."""
        answer = super().answer(probabilities, top_k)
        if unknown_score is None:
            return answer
        answer |= {"unknown_score": unknown_score, "unknown": self._is_unknown(unknown_score)}
        if answer["unknown"]:
            answer |= {"closest": answer["class"], "class": UNKNOWN}
        return answer

    def _is_unknown(self, unknown_score: float | None) -> bool:
        return unknown_score is not None and unknown_score > float(self.unknown_threshold)  # inf: never

    def dashboard(self) -> dict[str, Any]:
        return self._dashboard([r"train/acc_epoch", r"val/acc"], "accuracy (train, val)")
