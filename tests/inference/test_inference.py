"""Using a trained model: predict on new images, export to pt2 and ONNX, the classification report."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import PHOTO_CLASSES as CLASSES
from tests.conftest import PHOTO_SIZES, QUIET, eval_pixels, photo, write_photo_folder
from transfer_lightning import checkpoints
from transfer_lightning.commands.main import main
from transfer_lightning.inference import export
from transfer_lightning.tasks.classification_report import ClassificationMetrics


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> Path:
    """Unlabeled photos of mixed sizes and formats, nested two levels deep, and one file that is no image."""
    root = tmp_path_factory.mktemp("new_images")
    generator = torch.Generator().manual_seed(7)
    for index in range(9):
        folder = root / f"camera{index % 2}" / ("2025" if index % 3 else "")
        folder.mkdir(parents=True, exist_ok=True)
        image = photo(index % 3, PHOTO_SIZES[index % len(PHOTO_SIZES)], generator)
        image.save(folder / f"img{index}.{'png' if index == 4 else 'jpg'}")
    (root / "camera0" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


def predict(trained: Path, target: Path, run_dir: Path, *extra: str) -> list[dict[str, str]]:
    main(["predict", f"--ckpt_path={trained / 'last.ckpt'}", f"--data.predict_dir={target}", *extra])
    (csv_file,) = run_dir.glob("lightning_logs/version_*/predictions.csv")
    return list(csv.DictReader(csv_file.open()))


def caller_images(paths: list[Path], trained: Path) -> torch.Tensor:
    """What a user of an exported model feeds it: each photo resized as FILE.json says (torchvision's transforms)."""
    prep = checkpoints.preprocessing(checkpoints.read_checkpoint(trained / "last.ckpt"), "last.ckpt")
    return torch.stack([eval_pixels(path, prep) for path in paths])


# --- predict -------------------------------------------------------------------------------------


def test_predict_dir_scores_new_images_from_the_checkpoint_alone(trained, new_images, run_dir, caplog):
    caplog.set_level(logging.INFO)
    rows = predict(trained, new_images, run_dir, f"--data.cache_dir={run_dir / 'cache'}", *QUIET)

    decodable = sorted(p.relative_to(new_images).as_posix() for p in new_images.rglob("img*"))
    assert sorted(row["path"] for row in rows) == decodable  # one row per decodable image, path relative to DIR
    columns = ["path", "predicted_class", "probability", "unknown_score", "unknown"]
    columns += [f"top{k}_{what}" for k in (1, 2, 3) for what in ("class", "probability")]  # k = min(5, 3 classes)
    assert list(rows[0]) == columns
    # Each row holds what the checkpoint's network gives for that file, decoded here independently.
    model, preprocessing = export.load_classifier(trained / "last.ckpt")
    with torch.no_grad():
        expected = model.network(preprocessing(caller_images([new_images / row["path"] for row in rows], trained)))
    threshold = float(model.task.unknown_threshold)
    for row, probabilities, logits in zip(rows, expected.softmax(dim=-1), expected, strict=True):
        assert float(row["unknown_score"]) == pytest.approx(-float(logits.logsumexp(-1)), abs=1e-4)  # the energy
        assert row["unknown"] == str(float(row["unknown_score"]) > threshold).lower()  # inf: never unknown
        # Ranks by value: classes whose probabilities tie within float noise may come in either order on
        # another CPU, so each rank's class must have the rank's probability, not a fixed name.
        ranked = sorted(probabilities.tolist(), reverse=True)
        of_class = dict(zip(CLASSES, probabilities.tolist(), strict=True))
        named = [row[f"top{k}_class"] for k in (1, 2, 3)]
        assert sorted(named) == sorted(CLASSES)
        assert [of_class[name] for name in named] == pytest.approx(ranked, abs=1e-5)
        written = [float(row[f"top{k}_probability"]) for k in (1, 2, 3)]
        assert written == pytest.approx(ranked, abs=1e-5)
        predicted = "unknown" if row["unknown"] == "true" else row["top1_class"]
        assert row["predicted_class"] == predicted and row["probability"] == row["top1_probability"]
    assert "broken.jpg" in caplog.text and "do not decode" in caplog.text  # listed, never silently skipped


def test_predict_takes_a_single_file_and_a_top_k(trained, new_images, run_dir):
    image = new_images / "camera1" / "2025" / "img1.jpg"
    rows = predict(trained, image, run_dir, "--predictions.top_k=1", *QUIET)
    assert [row["path"] for row in rows] == [str(image)]
    assert list(rows[0]) == [
        "path", "predicted_class", "probability", "unknown_score", "unknown", "top1_class", "top1_probability"
    ]  # fmt: skip


def test_predict_dir_mistakes_are_one_clear_error(trained, run_dir, capsys):
    for args, message in [
        ([f"--data.predict_dir={run_dir / 'nowhere'}", f"--ckpt_path={trained / 'last.ckpt'}"], "does not exist"),
        ([f"--data.predict_dir={run_dir}"], "predict scores a trained model: pass --ckpt_path"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", *args, *QUIET])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --- export --------------------------------------------------------------------------------------

FORMATS = [
    "pt2",
    pytest.param(
        "onnx",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("onnxruntime") is None, reason="the [export] extra is not installed"
        ),
    ),
]


@pytest.mark.parametrize("format", FORMATS)
def test_exported_model_agrees_with_the_checkpoint_and_predict(format, trained, new_images, run_dir):
    output = run_dir / "out" / f"model.{format}"
    main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output={output}"])
    description = json.loads(Path(f"{output}.json").read_text())
    assert description["classes"] == list(CLASSES) and description["input"]["shape"] == ["N", 3, 32, 32]
    assert description["resize_to_cover"] == [37, 37] and description["center_crop"] == [32, 32]
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name, f"{output.name}.json"]  # no leftovers

    rows = predict(trained, new_images, run_dir, f"--data.cache_dir={run_dir / 'cache'}", *QUIET)
    images = caller_images([new_images / row["path"] for row in rows], trained)
    exported = export.run_exported(output, format, images).probabilities
    model, preprocessing = export.load_classifier(trained / "last.ckpt")
    with torch.no_grad():
        lightning = model(preprocessing(images)).softmax(dim=-1)
    assert exported.shape == (len(rows), len(CLASSES))  # a batch size other than the one exported with
    assert (exported - lightning).abs().max() <= 1e-4
    for row, probabilities in zip(rows, exported, strict=True):
        assert CLASSES[int(probabilities.argmax())] == row["predicted_class"]
        for k in (1, 2, 3):
            assert float(row[f"top{k}_probability"]) == pytest.approx(
                float(probabilities[CLASSES.index(row[f"top{k}_class"])]), abs=1e-4
            )


def test_pt2_file_runs_with_plain_torch(trained, tmp_path):
    """The guide's stand-alone snippet (docs/guides/use.md): only torch, no transfer_lightning."""
    output = export.export(trained / "last.ckpt", tmp_path / "model.pt2")
    program = torch.export.load(output).module()
    probabilities, unknown_scores = program(torch.zeros(5, 3, 32, 32, dtype=torch.uint8))
    assert probabilities.shape == (5, 3) and unknown_scores.shape == (5,)
    model, preprocessing = export.load_classifier(trained / "last.ckpt")
    with torch.no_grad():
        logits = model(preprocessing(torch.zeros(5, 3, 32, 32, dtype=torch.uint8)))
    torch.testing.assert_close(unknown_scores, -logits.logsumexp(-1), atol=1e-4, rtol=0)  # the energy


def test_export_mistakes_are_one_clear_error(trained, tmp_path, monkeypatch, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        ([f"--ckpt_path={garbage}", "--format=pt2"], "not a checkpoint"),
        ([f"--ckpt_path={tmp_path / 'missing.ckpt'}", "--format=pt2"], "does not exist"),
        ([f"--ckpt_path={trained / 'last.ckpt'}", f"--output={tmp_path / 'model.tflite'}"], "Unknown export format"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real_find_spec(n))
    with pytest.raises(SystemExit):
        main(["export", f"--ckpt_path={trained / 'last.ckpt'}", f"--output={tmp_path / 'model.onnx'}"])
    assert "[export]" in capsys.readouterr().err
    assert not list(tmp_path.glob("model*"))


# --- what checkpoints carry ----------------------------------------------------------------------


def test_checkpoints_carry_what_inference_needs(trained):
    checkpoint = checkpoints.read_checkpoint(trained / "last.ckpt")
    assert checkpoint["hyper_parameters"]["backbone"] == "resnet18"
    assert checkpoint["hyper_parameters"]["class_names"] == list(CLASSES)
    assert checkpoints.data_settings(checkpoint) == {
        "class_names": list(CLASSES),
        "image_size": 32,
        "normalization": "auto",  # resolved from the weights: ImageNet statistics, as below
    }
    preprocessing = checkpoints.preprocessing(checkpoint, "last.ckpt")
    assert (preprocessing.stored_size, preprocessing.view, preprocessing.image_size) == ((37, 37), "crop", 32)
    assert preprocessing.mean == (0.485, 0.456, 0.406)


def old_checkpoint(trained: Path, tmp_path: Path) -> Path:
    """The trained checkpoint as versions before 2026-11-28 wrote it: without the data module's state."""
    checkpoint = torch.load(trained / "last.ckpt", weights_only=True)
    del checkpoint["ImageFolderDataModule"]
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    return path


def test_old_checkpoints_work_where_possible_and_fail_clearly_elsewhere(trained, new_images, run_dir, capsys):
    old = old_checkpoint(trained, run_dir)
    with pytest.raises(SystemExit):
        main(["export", f"--ckpt_path={old}", "--format=pt2"])
    assert "saved by an older transfer_lightning" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", f"--ckpt_path={old}", f"--data.predict_dir={new_images}", *QUIET])
    assert "pass the training data's --data.data_dir" in capsys.readouterr().err

    # With the training data at hand, the old checkpoint predicts as the new one does.
    photos = write_photo_folder(run_dir / "photos", {"train": 12, "val": 4}, classes=CLASSES)
    main(["predict", f"--ckpt_path={old}", f"--data.predict_dir={new_images}", f"--data.data_dir={photos}", *QUIET])
    main(["predict", f"--ckpt_path={trained / 'last.ckpt'}", f"--data.predict_dir={new_images}", *QUIET])
    old_rows, new_rows = (
        list(csv.DictReader((run_dir / "lightning_logs" / f"version_{n}" / "predictions.csv").open())) for n in (1, 2)
    )
    assert old_rows == new_rows


# --- the classification report -------------------------------------------------------------------


def test_test_prints_and_saves_the_report_and_absent_classes_are_not_zero(image_folder, run_dir, caplog):
    caplog.set_level(logging.INFO)
    args = [f"--data.data_dir={image_folder}", f"--data.cache_dir={run_dir / 'cache'}", "--data.batch_size=8"]
    args += ["--model.weights=null", "--data.val_size=20", *QUIET]
    main(["fit", *args, "--trainer.max_epochs=1", "--test_after_fit=false"])
    checkpoint = next(run_dir.rglob("last.ckpt"))
    # The test folder is sorted by class: its first quarter, one batch of 8, holds cats only. (An int 1 would
    # be read as the float 1.0, all batches.)
    main(["test", *args, f"--ckpt_path={checkpoint}", "--trainer.limit_test_batches=0.25"])

    report = (run_dir / "lightning_logs" / "version_1" / "classification_report.md").read_text()
    assert "# Classification report" in report and report in caplog.text.replace("\n(saved as", "(saved as")
    per_class = report.split("## ")[0]
    table = {line.split(" | ")[0].strip("| "): line for line in per_class.splitlines() if line.startswith("| ")}
    for name in ("dog", "frog", "ship"):
        assert table[name] == f"| {name} | absent | absent | absent | 0 |"
    assert table["cat"].endswith("| 8 |")
    assert "macro-F1" in report and "top-5" not in report  # 4 classes: no top-5 accuracy
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run_dir / "lightning_logs" / "version_1")).Reload().Tags()["scalars"])
    assert {"test/acc_cat", "test/f1_macro"} <= tags
    assert not {"test/acc_dog", "test/acc_frog", "test/acc_ship"} & tags  # absent, not 0%


def test_report_numbers_by_hand():
    names = [f"c{i}" for i in range(7)]
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])  # classes 4-6 have no test image
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2, 5, 1])
    logits = torch.nn.functional.one_hot(predicted, 7).float() - 0.01 * torch.arange(7)  # no ties
    logits[:, 6] += 0.5  # every image's second guess: c6, then c0, c1, c2, ...
    metrics = ClassificationMetrics(7)
    metrics.update(logits, labels)
    report = metrics.compute(names)
    confusion = report.confusion

    assert report.support == [4, 2, 3, 1, 0, 0, 0]
    assert report.accuracy == pytest.approx(6 / 10)
    assert report.top_k_accuracy == pytest.approx(1.0)  # every true class is within c_pred, c6, c0, c1, c2
    assert report.precision[:4] == pytest.approx([3 / 4, 1 / 3, 1.0, math.nan], nan_ok=True)  # c3 never predicted
    assert report.recall[:4] == pytest.approx([3 / 4, 1 / 2, 2 / 3, 0.0])
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in [(3 / 4, 3 / 4), (1 / 3, 1 / 2), (1, 2 / 3), (0, 0)]]
    assert report.f1[:4] == pytest.approx(f1)
    assert all(math.isnan(value) for value in report.recall[4:] + report.f1[4:] + report.precision[4:])
    assert report.macro_f1 == pytest.approx(sum(f1) / 4)  # over the 4 classes with test images
    assert sorted(report.confused) == [("c0", "c1", 1), ("c1", "c0", 1), ("c2", "c5", 1), ("c3", "c1", 1)]
    assert int(confusion.sum()) == 10
    assert "| c4 | absent | absent | absent | 0 |" in report.to_markdown()


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the [export] extra is not installed")
def test_the_guide_snippets_run_without_this_package_and_agree_with_predict(trained, run_dir):
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "use.md").read_text()
    section = guide[guide.index("Without this package, ONNX") :]
    onnx_snippet, torch_snippet = (block.split("\n", 1)[1] for block in section.split("```python")[1:3])
    onnx_snippet, torch_snippet = (block[: block.index("```")] for block in (onnx_snippet, torch_snippet))
    assert "transfer_lightning" not in onnx_snippet + torch_snippet
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, as phones do: without exif_transpose the snippet sees another image
    photo(1, (90, 61), torch.Generator().manual_seed(3)).save(run_dir / "photo.jpg", exif=exif)
    for format in ("onnx", "pt2"):
        export.export(trained / "last.ckpt", run_dir / f"model.{format}")

    namespace: dict = {}
    results, scores = [], []
    for snippet in (onnx_snippet, torch_snippet):  # the guide's own code, run as a reader would
        exec(snippet, namespace)
        results.append(torch.as_tensor(namespace["probabilities"]).flatten())
        scores.append(float(torch.as_tensor(namespace["unknown_score"])[0]))
    # What the snippet feeds the model is exactly what predict decodes: the upright photo, resized and cropped.
    preprocessing = checkpoints.preprocessing(checkpoints.read_checkpoint(trained / "last.ckpt"), "last.ckpt")
    assert torch.equal(torch.from_numpy(namespace["pixels"][0]), eval_pixels(run_dir / "photo.jpg", preprocessing))
    (row,) = predict(trained, run_dir / "photo.jpg", run_dir, *QUIET)
    for probabilities, score in zip(results, scores, strict=True):
        assert CLASSES[int(probabilities.argmax())] == row["top1_class"]
        assert float(probabilities.max()) == pytest.approx(float(row["probability"]), abs=1e-4)
        assert score == pytest.approx(float(row["unknown_score"]), abs=1e-4)
    assert str(namespace["unknown"]).lower() == row["unknown"]


def test_export_of_a_cifar_run_upsamples_inside_the_model(cifar_batches, run_dir):
    """Images of one size (CIFAR-10's 32 px) trained at --data.image_size 48: the file takes 32 px, resizes inside."""
    args = [f"--data.data_dir={cifar_batches}", "--data.image_size=48", "--data.val_size=20", "--data.batch_size=20"]
    main(["fit", *args, "--model.weights=null", "--trainer.max_epochs=1", "--test_after_fit=false", *QUIET])
    checkpoint = next(run_dir.rglob("last.ckpt"))
    output = export.export(checkpoint, run_dir / "cifar.pt2")  # checked against the checkpoint inside
    description = json.loads(Path(f"{output}.json").read_text())
    assert description["input"]["shape"] == ["N", 3, 32, 32] and description["resize_to_cover"] == [32, 32]
    assert description["inside_the_model"]["network_input_size"] == 48
    assert description["classes"][:2] == ["airplane", "automobile"]
