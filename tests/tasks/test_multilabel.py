"""Several labels per image: metrics by hand, and fit / test / predict / export through the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import (
    QUIET,
    TAGS,
    best_checkpoint,
    prepared_by_hand,
    table_args,
    tagged_image,
)
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.data import ImageFolderDataModule, decode_image
from transfer_lightning.data.datasets import positive_weights
from transfer_lightning.inference import export
from transfer_lightning.model import TransferClassifier
from transfer_lightning.reporting.runs import markdown_table, read_run
from transfer_lightning.tasks.multilabel import multilabel_report, pick_thresholds

FORMATS = ["pt2"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])


def network_probabilities(model: TransferClassifier, datamodule: ImageFolderDataModule, split: str) -> torch.Tensor:
    """Sigmoid outputs of the bare network on a split's images, prepared by ``prepare_batch`` (no Lightning loop)."""
    images, _ = getattr(datamodule, split).to_arrays()
    inputs = prepared_by_hand(datamodule, images, image_size=None, view="resize")
    with torch.no_grad():
        return model.eval().network(inputs).sigmoid()


def average_precision_by_hand(scores: list[float], positives: list[int]) -> float:
    """The mean, over the positive images, of the precision among the images scored at least as high."""
    ranked = sorted(zip(scores, positives, strict=True), reverse=True)
    hits, total = 0, 0.0
    for rank, (_, positive) in enumerate(ranked, start=1):
        if positive:
            hits += 1
            total += hits / rank
    return total / hits


def loaded(root: Path) -> tuple[TransferClassifier, ImageFolderDataModule]:
    model = TransferClassifier.load_from_checkpoint(best_checkpoint(root), map_location="cpu", weights=None)
    datamodule = ImageFolderDataModule(
        labels_file=str(root / "tags.csv"), images_dir=str(root / "images"), cache_dir=str(root / "cache")
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return model, datamodule


# --- metrics by hand -----------------------------------------------------------------------------


def test_multilabel_report_equals_a_computation_by_hand():
    probabilities = torch.tensor([[0.9, 0.2, 0.6], [0.8, 0.7, 0.1], [0.3, 0.4, 0.35], [0.1, 0.6, 0.05]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    thresholds = torch.tensor([0.5, 0.5, 0.3])
    report = multilabel_report(probabilities, targets, thresholds, ["a", "b", "c"])
    # a: ranked 0.9 (+), 0.8 (-), 0.3 (+), 0.1 (-): AP = (1/1 + 2/3) / 2. b: 0.7 (+), 0.6 (+): AP 1. c: 0.6 (+): AP 1.
    assert report.average_precision == pytest.approx([(1 + 2 / 3) / 2, 1.0, 1.0])
    assert report.mean_average_precision == pytest.approx(((1 + 2 / 3) / 2 + 2) / 3)
    # At the thresholds: a predicted on images 0, 1 (tp 1, fp 1, fn 1); b on 1, 3 (tp 2); c on 0, 2 (tp 1, fp 1).
    assert report.precision == pytest.approx([0.5, 1.0, 0.5]) and report.recall == pytest.approx([0.5, 1.0, 1.0])
    assert report.f1 == pytest.approx([0.5, 1.0, 2 / 3])
    assert report.micro_f1 == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))  # tp 4, fp 2, fn 1
    assert report.macro_f1 == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert report.support == [2, 2, 1] and report.missed == [("a", 1)] and report.invented == [("a", 1), ("c", 1)]
    assert "| a | 83.3% | 50.0% | 50.0% | 50.0% | 0.50 | 2 |" in report.to_markdown()


def test_thresholds_are_the_best_f1_on_the_grid_and_a_class_without_positives_keeps_one_half():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 3, generator=generator) < 0.3).long()
    targets[:, 2] = 0
    probabilities = (0.35 * targets + 0.65 * torch.rand(200, 3, generator=generator)).clamp(0, 1)
    picked = pick_thresholds(probabilities, targets)
    for c in range(2):
        best = max(
            (f1_at(probabilities[:, c], targets[:, c], t / 100), -t) for t in range(1, 100)
        )  # the best F1, the lowest threshold among ties
        assert float(picked[c]) == pytest.approx(-best[1] / 100)
    assert float(picked[2]) == 0.5


def f1_at(scores: torch.Tensor, positives: torch.Tensor, threshold: float) -> float:
    predicted = scores >= threshold
    tp = int((predicted & (positives == 1)).sum())
    fp, fn = int((predicted & (positives == 0)).sum()), int((~predicted & (positives == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def test_flip_tta_averages_the_sigmoids_and_pos_weight_balances_each_class():
    model = TransferClassifier(
        backbone="resnet18", weights=None, num_classes=4, task="multilabel", tta_flip=True, channels_last=False
    ).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = (model.network(images).sigmoid() + model.network(images.flip(-1)).sigmoid()) / 2
        assert torch.allclose(model.evaluation_logits(images).sigmoid(), expected, atol=1e-6)
    labels = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]])
    assert positive_weights(labels).tolist() == pytest.approx([1 / 3, 3.0])


# --- through the CLI ------------------------------------------------------------------------------


def test_fit_picks_thresholds_on_validation_and_test_scores_equal_a_computation_by_hand(tagged):
    checkpoint = torch.load(best_checkpoint(tagged), map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["task"] == "multilabel"
    assert "val_mAP" in best_checkpoint(tagged).name
    model, datamodule = loaded(tagged)
    assert datamodule.task == "multilabel" and datamodule.class_names == sorted(TAGS)
    # The thresholds saved are those that give the best F1 on the validation images, recomputed here.
    val_probabilities = network_probabilities(model, datamodule, "val_set")
    expected = pick_thresholds(val_probabilities, datamodule.val_set.labels)
    assert torch.equal(checkpoint["state_dict"]["task.thresholds"], expected)
    assert torch.equal(model.task.thresholds, expected)  # reloaded from the checkpoint
    # The test scores logged by fit's test of the best checkpoint, against AP computed by hand.
    run = read_run(tagged / "lightning_logs" / "version_0")
    test_probabilities = network_probabilities(model, datamodule, "test_set")
    targets = datamodule.test_set.labels
    by_hand = [average_precision_by_hand(test_probabilities[:, c].tolist(), targets[:, c].tolist()) for c in range(4)]
    assert run.scalars["test/mAP"][-1] == pytest.approx(sum(by_hand) / 4, abs=1e-6)
    assert run.scalars["test/AP_sea"][-1] == pytest.approx(by_hand[sorted(TAGS).index("sea")], abs=1e-6)
    assert sum(by_hand) / 4 > 0.8  # it learned: chance is the share of positives, about 0.43
    report = (tagged / "lightning_logs" / "version_0" / "classification_report.md").read_text()
    assert report.startswith("# Multi-label classification report") and "Most often missed" in report
    assert "mAP" in markdown_table([run])
    # The top losses: each image's binary cross-entropy averaged over the classes, the highest first.
    images, _ = datamodule.test_set.to_arrays()
    inputs = prepared_by_hand(datamodule, images, image_size=None, view="resize")
    with torch.no_grad():
        logits = model.eval().network(inputs)
    losses = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(dim=1)
    with open(tagged / "lightning_logs" / "version_0" / "top_losses.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        losses.sort(descending=True).values[:16].tolist(), abs=1e-4
    )
    first = int(rows[0]["index"])
    assert rows[0]["true"] == " ".join(n for n, t in zip(sorted(TAGS), targets[first].tolist(), strict=True) if t)
    assert (tagged / "lightning_logs" / "version_0" / "top_losses_cam.png").is_file()
    assert not (tagged / "lightning_logs" / "version_0" / "most_confused.png").exists()  # multiclass only


def test_predict_writes_the_labels_above_threshold_and_every_probability(tagged, tmp_path, run_dir):
    new = tmp_path / "new"
    new.mkdir()
    generator = torch.Generator().manual_seed(5)
    for index, present in enumerate([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]]):
        tagged_image(present, generator).save(new / f"photo{index}.png")
    main(["predict", f"--ckpt_path={best_checkpoint(tagged)}", f"--data.predict_dir={new}", *QUIET])
    rows = list(csv.DictReader(next(run_dir.glob("lightning_logs/version_*/predictions.csv")).open()))
    names = sorted(TAGS)
    assert list(rows[0]) == ["path", "labels", *(f"probability_{name}" for name in names)]
    model, _ = loaded(tagged)
    for format in FORMATS:  # the exported file agrees with predict
        output = tmp_path / f"model.{format}"
        main(["export", f"--ckpt_path={best_checkpoint(tagged)}", f"--output={output}"])
        description = json.loads(Path(f"{output}.json").read_text())
        assert description["task"] == "multilabel"
        assert list(description["output"]["thresholds"].values()) == pytest.approx(model.task.thresholds.tolist())
        images = torch.stack([torch.from_numpy(decode_image(str(new / row["path"]))) for row in rows])
        outputs = export.run_exported(output, format, images)
        assert outputs.unknown_scores is None  # multi-label: no class above its threshold is already "none"
        probabilities = outputs.probabilities
        for row, expected in zip(rows, probabilities, strict=True):
            written = [float(row[f"probability_{name}"]) for name in names]
            assert written == pytest.approx(expected.tolist(), abs=1e-4)
            chosen = [name for name, p, t in zip(names, written, model.task.thresholds.tolist(), strict=True) if p >= t]
            assert row["labels"] == " ".join(chosen)


def test_predict_on_the_test_split_writes_the_true_labels(tagged, run_dir):
    main(["predict", *table_args(tagged / "tags.csv", tagged / "cache"), f"--ckpt_path={best_checkpoint(tagged)}"])
    rows = list(csv.DictReader(next(run_dir.glob("lightning_logs/version_*/predictions.csv")).open()))
    table = list(csv.DictReader((tagged / "tags.csv").open()))
    assert [row["true_labels"] for row in rows] == [row["tags"] for row in table if row["split"] == "test"]
    assert [int(row["index"]) for row in rows] == list(range(len(rows)))


@pytest.mark.parametrize(
    "options",
    [
        ["--model.freeze_backbone=true"],
        ["--model.freeze_backbone=true", "--model.unfreeze_at_epoch=1", "--model.tta_flip=true"],
        ["--data.class_balance=loss", "--model.label_smoothing=0.1", "--model.threshold=0.4"],
        ["--model.freeze_backbone=true", "--model.head=mlp", "--model.stage_features=[layer3]"]
        + ["--feature_cache.train_flips=true"],
    ],
    ids=["frozen-features", "gradual-unfreezing-tta", "pos-weight-smoothing-threshold", "mlp-stages-flipped-features"],
)
def test_multilabel_trains_with_the_options_of_the_recipes(options, tagged, run_dir, caplog):
    caplog.set_level(logging.INFO)
    args = [*table_args(tagged / "tags.csv", tagged / "cache"), "--trainer.max_epochs=2", *options]
    cli = TransferLightningCLI(args=["fit", *args])
    logged = cli.trainer.callback_metrics
    logged_tags = set(read_run(Path(cli.trainer.log_dir)).scalars)
    assert {"val/mAP", "val/f1_macro", "val/f1_micro", "val/AP_sea", "test/mAP", "test/AP_sea"} <= logged_tags
    if "--model.freeze_backbone=true" in options and "--model.unfreeze_at_epoch=1" not in options:
        assert "Frozen-feature cache: features of" in caplog.text
    if "--feature_cache.train_flips=true" in options:
        assert "mirrored training images added as rows" in caplog.text
    if "--model.threshold=0.4" in options:
        assert cli.model.task.thresholds.tolist() == pytest.approx([0.4] * 4)
        weights = cli.datamodule.loss_weights
        positives = cli.datamodule.train_set.labels.double().sum(dim=0)
        assert weights.tolist() == pytest.approx(((len(cli.datamodule.train_set) - positives) / positives).tolist())
    # The test scores logged equal AP recomputed outside Lightning's loop, features and TTA included.
    model, datamodule = cli.model.eval(), cli.datamodule
    probabilities = network_probabilities(model, datamodule, "test_set")
    if model.hparams.tta_flip:
        images, _ = datamodule.test_set.to_arrays()
        inputs = prepared_by_hand(datamodule, images, image_size=None, view="resize")
        with torch.no_grad():
            probabilities = (probabilities + model.network(inputs.flip(-1)).sigmoid()) / 2
    targets = datamodule.test_set.labels
    by_hand = [average_precision_by_hand(probabilities[:, c].tolist(), targets[:, c].tolist()) for c in range(4)]
    assert float(logged["test/mAP"]) == pytest.approx(sum(by_hand) / 4, abs=1e-5)


def test_a_multiclass_model_refuses_multilabel_data(tagged, run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *table_args(tagged / "tags.csv", tagged / "cache"), "--model.task=multiclass"])
    error = capsys.readouterr().err
    assert "several labels, but model.task is multiclass" in error
    assert not (run_dir / "lightning_logs").exists()


def test_a_folder_data_set_trains_as_multilabel_when_asked(image_folder, run_dir, tmp_path):
    args = [f"--data.data_dir={image_folder}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.val_size=20"]
    cli = TransferLightningCLI(
        args=["fit", *args, "--model.weights=null", "--model.task=multilabel", "--trainer.fast_dev_run=true", *QUIET]
    )
    assert not cli.model.task.single_label and "test/mAP" in cli.trainer.callback_metrics
    shutil.rmtree(run_dir / "lightning_logs", ignore_errors=True)


MULTILABEL_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "multilabel").glob("*.yaml"))


@pytest.mark.filterwarnings("ignore:model.scheduler .* has T_max")  # the recipes are cut to 2 epochs here
@pytest.mark.parametrize("config", MULTILABEL_CONFIGS, ids=lambda path: path.stem)
def test_multilabel_configs_run_and_comment_every_setting(config, tagged, run_dir):
    settings = [line for line in config.read_text().splitlines() if ":" in line and not line.lstrip().startswith("#")]
    assert not [line for line in settings if line.split(":", 1)[1].strip() and "#" not in line]
    shrink = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--data.image_size=32"]
    if "warmup_steps" in config.read_text():
        shrink.append("--model.scheduler.warmup_steps=1")
    args = [*table_args(tagged / "tags.csv", tagged / "cache"), *shrink]
    cli = TransferLightningCLI(args=["fit", f"--config={config}", *args])
    assert not cli.model.task.single_label and cli.trainer.current_epoch == 2
    assert "test/mAP" in cli.trainer.callback_metrics
