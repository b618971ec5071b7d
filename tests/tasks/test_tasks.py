"""The task objects: each rule checked against an independent computation, for both kinds of labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transfer_lightning.tasks import MulticlassTask, MultilabelTask, create_task
from transfer_lightning.tasks.multilabel import pick_thresholds

NAMES = ["cat", "dog", "frog"]


def test_the_flip_average_is_the_mean_of_the_two_probabilities():
    """Both tasks' flip_average give logits whose probabilities are the plain mean, computed here in float64."""
    generator = torch.Generator().manual_seed(0)
    logits, mirrored = torch.randn(8, 3, generator=generator) * 4, torch.randn(8, 3, generator=generator) * 4
    multiclass, multilabel = MulticlassTask(NAMES), MultilabelTask(NAMES)
    softmax_mean = (logits.double().softmax(-1) + mirrored.double().softmax(-1)) / 2
    assert torch.allclose(multiclass.probabilities(multiclass.flip_average(logits, mirrored)).double(), softmax_mean)
    sigmoid_mean = (logits.double().sigmoid() + mirrored.double().sigmoid()) / 2
    averaged = multilabel.probabilities(multilabel.flip_average(logits, mirrored)).double()
    assert torch.allclose(averaged, sigmoid_mean, atol=1e-6)


def test_losses_match_their_definitions():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    task = MulticlassTask(NAMES)
    by_hand = [-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))), -math.log(1 / (2 + math.e))]
    assert task.evaluation_loss(logits, labels).tolist() == pytest.approx(by_hand, rel=1e-6)
    smoothed = 0.9 * by_hand[0] + 0.1 * -sum(F.log_softmax(logits[0], -1).tolist()) / 3
    assert float(task.training_loss(logits[:1], labels[:1], label_smoothing=0.1)) == pytest.approx(smoothed, rel=1e-6)
    multi, targets = MultilabelTask(NAMES), torch.tensor([[1, 0, 1], [0, 0, 0]])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = [
        -sum(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)) for x, t in zip(r, s, strict=True)) / 3
        for r, s in zip(logits.tolist(), targets.tolist(), strict=True)
    ]
    assert multi.evaluation_loss(logits, targets).tolist() == pytest.approx(bce, rel=1e-6)


def test_labels_from_probabilities_and_as_text():
    multiclass = MulticlassTask(NAMES)
    probabilities = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    assert multiclass.chosen(probabilities).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert multiclass.label_text(torch.tensor(2)) == "frog"
    multilabel = MultilabelTask(["sea", "sand dune", "sky"], threshold=0.45)
    assert multilabel.chosen(probabilities).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert multilabel.label_text(torch.tensor([1, 1, 0])) == "sea;sand dune"  # a name holds a space: ";"
    assert multilabel.prediction_cells(probabilities[1], 2) == ["sea", "0.500000", "0.100000", "0.400000"]
    expected = ["cat", "0.500000", "", "false", "cat", "0.500000", "frog", "0.400000"]  # predicted, then the top 2
    assert multiclass.prediction_cells(probabilities[1], 2) == expected  # a file that gives no unknown score
    multiclass.unknown_threshold.fill_(-2.0)
    assert multiclass.prediction_cells(probabilities[1], 2, -2.5)[:4] == ["cat", "0.500000", "-2.500000", "false"]
    assert multiclass.prediction_cells(probabilities[1], 2, -1.5)[:4] == ["unknown", "0.500000", "-1.500000", "true"]


def test_multilabel_thresholds_travel_with_the_task_and_its_description():
    task = create_task("multilabel", NAMES)
    task.thresholds.copy_(torch.tensor([0.2, 0.5, 0.9]))
    assert set(task.state_dict()) == {"thresholds"}  # saved in checkpoints, carried into exported models
    copy = create_task("multilabel", NAMES)
    copy.load_output_description(task.describe_output())
    assert torch.equal(copy.thresholds, task.thresholds)
    multiclass = create_task("multiclass", NAMES)
    multiclass.temperature.fill_(2.5)
    multiclass.unknown_threshold.fill_(-3.25)
    assert set(multiclass.state_dict()) == {"temperature", "unknown_threshold"}  # calibration, and "none of these"
    copy = create_task("multiclass", NAMES)
    copy.load_output_description(multiclass.describe_output())
    assert float(copy.temperature) == 2.5 and float(copy.unknown_threshold) == -3.25


def test_thresholds_are_picked_where_f1_is_best():
    """Class 0 separates perfectly between 0.25 and 0.6: the lowest grid threshold above 0.25 wins (0.26, one
    grid step clear of the negative); class 1 has no positive, so it keeps the default."""
    probabilities = torch.tensor([[0.6, 0.2], [0.7, 0.9], [0.25, 0.1], [0.1, 0.4]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]])
    assert pick_thresholds(probabilities, targets).tolist() == pytest.approx([0.26, 0.5])


def test_the_multiclass_report_counts_by_hand():
    task = MulticlassTask(NAMES)
    metrics = task.metrics()
    logits = torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0], [0, 0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # one dog taken for a cat
    metrics.update("test", logits, labels)
    report = metrics.test_end(task)
    assert report.accuracy == pytest.approx(4 / 5)
    assert report.recall == pytest.approx([1.0, 0.5, 1.0]) and report.precision == pytest.approx([2 / 3, 1.0, 1.0])
    assert report.confused == [("dog", "cat", 1)]
    assert report.scalars()["test/acc_dog"] == pytest.approx(0.5)
    assert "test/confusion_matrix" in report.figures()


def test_monitor_and_checkpoint_names_follow_the_score():
    for task, score in ((MulticlassTask(NAMES), "acc"), (MultilabelTask(NAMES), "mAP")):
        assert task.monitor == f"val/{score}"
        assert task.checkpoint_filename == f"best-epoch{{epoch:02d}}-val_{score}{{val/{score}:.4f}}"
