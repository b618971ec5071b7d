""" "None of these": an image of a class held out of training gets a higher unknown score than the known classes'
images, the threshold chosen on validation keeps the set share of them, and every way the model answers agrees."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import QUIET, eval_pixels
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.inference import export
from transfer_lightning.reporting.runs import read_run
from transfer_lightning.serving.requests import answer, load_model
from transfer_lightning.tasks import MulticlassTask, create_task
from transfer_lightning.tasks.unknowns import known_threshold

#: Centres of three known classes and of one held out of training, in an 8-dimensional feature space.
CENTRES = torch.eye(8)[:4] * 4


def clusters(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around :data:`CENTRES` (unit noise), with their class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per_class)
    return CENTRES[labels] + torch.randn(len(labels), 8, generator=generator), labels


def trained_head(features: torch.Tensor, labels: torch.Tensor) -> torch.nn.Linear:
    """A logistic regression on the known classes' features (as the L-BFGS head of a frozen backbone)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def test_a_class_held_out_of_training_is_rejected_and_the_known_rate_is_kept():
    train, train_labels = clusters(200, seed=0)
    val, val_labels = clusters(200, seed=1)
    test, test_labels = clusters(500, seed=2)
    known = train_labels < 3
    head = trained_head(train[known], train_labels[known])
    task = create_task("multiclass", ["a", "b", "c"])
    with torch.no_grad():
        val_logits = head(val[val_labels < 3])
        test_logits = head(test)
    task.fit_on_validation(val_logits, val_labels[val_labels < 3])
    # On validation the threshold keeps the set share (95%) of the known images: at least it, by at most one image.
    kept_on_val = float((~task.unknown(task.unknown_scores(val_logits))).float().mean())
    assert 0.95 - 1e-6 <= kept_on_val <= 0.95 + 1 / len(val_logits)
    rejected = task.unknown(task.unknown_scores(test_logits))
    assert float(rejected[test_labels < 3].float().mean()) == pytest.approx(0.05, abs=0.03)  # new known images
    assert float(rejected[test_labels == 3].float().mean()) > 0.5  # chance would reject 5% of the held-out class
    # The score is the energy, computed here by hand: -log(sum(exp(logits))).
    by_hand = -test_logits.exp().sum(dim=1).log()
    torch.testing.assert_close(task.unknown_scores(test_logits), by_hand)
    assert known_threshold(by_hand[:100], 0.9) == float(by_hand[:100].sort().values[89])  # 90 of 100 at or below


def test_the_answer_of_an_unknown_image_names_its_closest_class():
    task = MulticlassTask(["daisy", "rose", "tulip"])
    probabilities = torch.tensor([0.2, 0.7, 0.1])
    known = task.answer(probabilities, 2, -4.0)
    assert [entry["class"] for entry in known["top_k"]] == ["rose", "daisy"]
    assert {key: known[key] for key in ("class", "unknown_score", "unknown")} == {
        "class": "rose",
        "unknown_score": -4.0,
        "unknown": False,  # no threshold chosen: every image is given a known class
    }
    task.unknown_threshold.fill_(-5.0)
    unknown = task.answer(probabilities, 2, -4.0)
    assert unknown["class"] == "unknown" and unknown["closest"] == "rose" and unknown["unknown"] is True
    assert task.answer(probabilities, 2, -6.0)["class"] == "rose"
    assert "unknown" not in task.answer(probabilities, 2)  # a file exported without unknown scores


def test_no_rule_with_known_rate_null_and_for_multilabel():
    off = create_task("multiclass", ["a", "b", "c"], known_rate=None)
    val, labels = clusters(100, seed=1)
    off.fit_on_validation(val[:, :3] * 3, labels.clamp(max=2))
    assert not off.has_unknown_threshold and not off.unknown(torch.tensor([1e9])).any()
    assert create_task("multilabel", ["a", "b"]).unknown_scores(torch.zeros(2, 2)) is None


def test_fit_chooses_the_threshold_and_every_answer_agrees(image_folder, run_dir):
    """A CLI fit chooses the threshold on 60 validation images; test reports the share kept; predict's CSV, serve and
    the exported files give the unknown score of the checkpoint's network, computed here, within 1e-4."""
    args = [f"--data.data_dir={image_folder}", f"--data.cache_dir={run_dir / 'cache'}", "--data.val_size=60"]
    args += ["--data.batch_size=16", "--model.weights=null", "--model.optimizer=SGD", "--model.optimizer.lr=0.05"]
    cli = TransferLightningCLI(args=["fit", *args, "--trainer.max_epochs=2", "--seed_everything=0", *QUIET])
    metrics = cli.trainer.callback_metrics
    assert "test/known_kept" in metrics
    assert 0.8 <= float(metrics["test/known_kept"]) <= 1  # images like validation's: about 95% kept
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    report = (Path(cli.trainer.log_dir) / "classification_report.md").read_text()
    assert "None of these: the threshold on the unknown score, chosen on validation to keep 95.0%" in report
    model, preprocessing = export.load_classifier(best)
    threshold = float(model.task.unknown_threshold)
    logged = read_run(Path(cli.trainer.log_dir)).scalars["val/unknown_threshold"]
    assert len(logged) == 2 and min(abs(value - threshold) for value in logged) < 1e-5  # the best checkpoint's

    main(["predict", f"--ckpt_path={best}", f"--data.predict_dir={image_folder / 'test'}", *QUIET])
    (table,) = run_dir.glob("lightning_logs/version_1/predictions.csv")
    rows = list(csv.DictReader(table.open()))
    pixels = torch.stack([eval_pixels(image_folder / "test" / row["path"], preprocessing) for row in rows])
    with torch.no_grad():
        expected = -model.network(preprocessing(pixels)).logsumexp(dim=-1)
    for row, score in zip(rows, expected.tolist(), strict=True):
        assert float(row["unknown_score"]) == pytest.approx(score, abs=1e-4)
        assert row["unknown"] == str(score > threshold).lower()
        assert row["predicted_class"] == ("unknown" if score > threshold else row["top1_class"])

    served = load_model(str(best), None, "cpu")
    torch.testing.assert_close(served.run(pixels).unknown_scores, expected, atol=1e-4, rtol=0)
    served.task.unknown_threshold.fill_(float(expected.median()))  # half the images above it: answered unknown
    answers = answer(served, served.run(pixels), [row["path"] for row in rows], 3)
    for one, score in zip(answers, expected.tolist(), strict=True):
        assert (one["class"] == "unknown") == (score > float(expected.median())) == one["unknown"]
    for format in ["pt2"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else []):
        output = run_dir / f"model.{format}"
        main(["export", f"--ckpt_path={best}", f"--output={output}"])
        description = json.loads(Path(f"{output}.json").read_text())
        assert description["output"]["unknown_threshold"] == pytest.approx(threshold)
        assert description["unknown_score"]["name"] == "unknown_score"
        scores = export.run_exported(output, format, pixels).unknown_scores
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
