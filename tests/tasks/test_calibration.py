"""Calibration: a temperature fitted on validation makes the multiclass probabilities honest, keeps every top
class, and travels with the checkpoint into predict and the exported files."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, eval_pixels
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.inference import export
from transfer_lightning.reporting.runs import read_run
from transfer_lightning.serving.requests import load_model
from transfer_lightning.tasks import create_task
from transfer_lightning.tasks.calibration import fit_temperature, multilabel_calibration_error, reliability


def ece_by_hand(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error written out: |accuracy - confidence| per equal-width confidence bin, weighted."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    total = 0.0
    for low in range(bins):
        inside = (confidence > low / bins) & (confidence <= (low + 1) / bins)
        if inside.any():
            total += inside.float().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
    return float(total)


def overconfident(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model that is right about 70% of the time but says so with near certainty."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (count,), generator=generator)
    logits = torch.randn(count, 5, generator=generator)
    logits[torch.arange(count), labels] += 1.5
    return logits * 5, labels


def test_a_fitted_temperature_lowers_the_calibration_error_and_keeps_every_top_class():
    logits, labels = overconfident(3000, seed=0)
    task = create_task("multiclass", ["a", "b", "c", "d", "e"])
    before = task.probabilities(logits)
    task.fit_on_validation(logits, labels)
    after = task.probabilities(logits)
    assert float(task.temperature) > 2  # over-confident logits are divided, not multiplied
    assert torch.equal(after.argmax(dim=1), before.argmax(dim=1))
    assert ece_by_hand(before, labels) > 0.15 and ece_by_hand(after, labels) < 0.04
    held_out, held_labels = overconfident(3000, seed=1)  # the fit generalises to new images of the same model
    assert ece_by_hand(task.probabilities(held_out), held_labels) < 0.04
    assert fit_temperature(logits / 5 * 3, labels) == pytest.approx(float(task.temperature) * 3 / 5, rel=1e-3)
    points = reliability(after, labels)  # the diagram's bins give back the error, weighted by their images
    assert sum(n * abs(a - c) for c, a, n in points) / len(labels) == pytest.approx(
        ece_by_hand(after, labels), abs=1e-4
    )


def test_too_few_validation_images_keep_temperature_one_and_say_so(caplog):
    logits, labels = overconfident(20, seed=0)
    task = create_task("multiclass", ["a", "b", "c", "d", "e"])
    with caplog.at_level(logging.INFO):
        task.fit_on_validation(logits, labels)
    assert float(task.temperature) == 1.0 and "20 validation images are too few" in caplog.text
    assert not task.has_unknown_threshold  # nor a threshold of "none of these"
    off = create_task("multiclass", ["a", "b", "c", "d", "e"], calibrate=False)
    off.fit_on_validation(*overconfident(3000, seed=0))
    assert float(off.temperature) == 1.0


def test_fit_keeps_the_temperature_and_predict_and_export_give_calibrated_probabilities(image_folder, run_dir):
    """60 validation images fit a temperature; test logs the calibration error before and after; predict's, serve's
    and the exported files' probabilities are softmax(logits / T) computed here from the checkpoint's network."""
    args = [f"--data.data_dir={image_folder}", f"--data.cache_dir={run_dir / 'cache'}", "--data.val_size=60"]
    args += ["--data.batch_size=16", "--model.weights=null", "--model.optimizer=SGD", "--model.optimizer.lr=0.05"]
    cli = TransferLightningCLI(args=["fit", *args, "--trainer.max_epochs=3", "--seed_everything=0", *QUIET])
    metrics = cli.trainer.callback_metrics
    assert {"test/ece", "test/ece_uncalibrated"} <= set(metrics)
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert "test/reliability_diagram" in read_run(Path(cli.trainer.log_dir)).images  # TensorBoard, and the report
    model, preprocessing = export.load_classifier(best)
    temperature = float(model.task.temperature)
    assert temperature != pytest.approx(1.0, abs=1e-3)
    photos = sorted((image_folder / "test" / "cat").iterdir())[:4]
    main(["predict", f"--ckpt_path={best}", f"--data.predict_dir={image_folder / 'test' / 'cat'}", *QUIET])
    (table,) = run_dir.glob("lightning_logs/version_1/predictions.csv")
    rows = {row["path"]: row for row in csv.DictReader(table.open())}
    pixels = torch.stack([eval_pixels(path, preprocessing) for path in photos])
    with torch.no_grad():
        expected = (model.network(preprocessing(pixels)) / temperature).softmax(dim=-1)
    for path, probabilities in zip(photos, expected, strict=True):
        assert float(rows[path.name]["probability"]) == pytest.approx(float(probabilities.max()), abs=1e-4)
    served = load_model(str(best), None, "cpu")  # what serve answers with
    torch.testing.assert_close(served.run(pixels).probabilities, expected, atol=1e-4, rtol=0)
    for format in ["pt2"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else []):
        output = run_dir / f"model.{format}"
        main(["export", f"--ckpt_path={best}", f"--output={output}"])
        assert json.loads(Path(f"{output}.json").read_text())["output"]["temperature"] == pytest.approx(temperature)
        exported = export.run_exported(output, format, pixels).probabilities
        torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)


def binary_ece_by_hand(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """A label's calibration error: |share of positives - mean probability| per probability bin, weighted."""
    total = 0.0
    for low in range(bins):
        inside = (probabilities > low / bins) & (probabilities <= (low + 1) / bins)
        if inside.any():
            total += inside.float().mean() * (targets[inside].float().mean() - probabilities[inside].mean()).abs()
    return float(total)


def test_the_multilabel_calibration_error_is_the_mean_of_each_labels():
    """Label 0's probabilities are honest (by construction), label 1's say 0.9 where 0.5 is true."""
    generator = torch.Generator().manual_seed(0)
    honest = torch.rand(4000, generator=generator)
    targets = torch.stack([(torch.rand(4000, generator=generator) < honest), torch.rand(4000) < 0.5], dim=1).long()
    probabilities = torch.stack([honest, torch.full((4000,), 0.9)], dim=1)
    by_hand = [binary_ece_by_hand(p, t) for p, t in zip(probabilities.T, targets.T, strict=True)]
    assert by_hand[0] < 0.03 and by_hand[1] == pytest.approx(0.4, abs=0.03)
    assert multilabel_calibration_error(probabilities, targets) == pytest.approx(sum(by_hand) / 2, abs=1e-3)
