"""Checkpoints: what they carry, checks against the model, and checkpoints written by older code still loading.

The older code is the real thing: the package as it was at :data:`OLD_COMMIT`, taken from this repository's
history and run in its own process, writes the checkpoints that today's code then tests, predicts and exports.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import write_image_folder, write_tagged_table
from transfer_lightning import checkpoints
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference import export

#: main before the package split and the task objects (issue 28): its multi-label checkpoints keep the
#: decision thresholds as the model's own buffer, and its modules had other names.
OLD_COMMIT = "6028e19"
REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TRAIN = ["--model.weights=null", "--model.optimizer=SGD", "--model.optimizer.lr=0.05", "--trainer.max_epochs=2"]


def start_old_code(code: Path, cwd: Path, args: list[str]) -> subprocess.Popen:
    """``python -m transfer_lightning ARGS`` with the package of :data:`OLD_COMMIT`, started in its own process."""
    environment = {**os.environ, "PYTHONPATH": str(code)}  # before site-packages, where today's package is
    command = [sys.executable, "-m", "transfer_lightning", *args]
    return subprocess.Popen(command, cwd=cwd, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]


def logged(run: Path, tag: str) -> float:
    return EventAccumulator(str(run)).Reload().Scalars(tag)[-1].value


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory) -> Path:
    """Runs of the old code: ``multiclass/`` on an image folder and ``multilabel/`` on a label table, each fitted
    and tested by that code (its test scores in its events)."""
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"needs this repository's git history (commit {OLD_COMMIT}); a shallow clone lacks it")
    root = tmp_path_factory.mktemp("old")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "transfer_lightning"], capture_output=True)
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(root / "code", filter="data")
    (root / "multiclass").mkdir()
    folder = write_image_folder(root / "multiclass" / "photos", train_per_class=12, test_per_class=4)
    data = [f"--data.data_dir={folder}", "--data.val_size=8", "--data.batch_size=16"]
    multiclass = start_old_code(
        root / "code", root / "multiclass", ["fit", *data, *TRAIN, "--model.tta_flip=true", *QUIET]
    )
    (root / "multilabel").mkdir()
    table = write_tagged_table(root / "multilabel", train=32, val=16, test=16)
    data = [f"--data.labels_file={table}", f"--data.images_dir={table.parent / 'images'}", "--data.batch_size=16"]
    multilabel = start_old_code(root / "code", root / "multilabel", ["fit", *data, *TRAIN, *QUIET])
    for process in (multiclass, multilabel):  # both at once: most of each is starting Python and importing torch
        finish(process)
    return root


def best_checkpoint(task_dir: Path) -> Path:
    return next((task_dir / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))


@pytest.mark.parametrize(("task", "score"), [("multiclass", "acc"), ("multilabel", "mAP")])
def test_old_checkpoints_test_to_the_same_scores(old_runs, task, score, tmp_path, monkeypatch):
    """Today's ``test`` of an old best checkpoint scores exactly what the old code's test after fit scored."""
    monkeypatch.chdir(tmp_path)
    ckpt = best_checkpoint(old_runs / task)
    if task == "multiclass":
        data = [f"--data.data_dir={old_runs / task / 'photos'}", "--data.val_size=8"]
    else:
        table = old_runs / task / "tags.csv"
        data = [f"--data.labels_file={table}", f"--data.images_dir={table.parent / 'images'}"]
    cli = TransferLightningCLI(args=["test", *data, "--data.batch_size=16", f"--ckpt_path={ckpt}", *QUIET])
    old_score = logged(old_runs / task / "lightning_logs" / "version_0", f"test/{score}")
    assert float(cli.trainer.callback_metrics[f"test/{score}"]) == pytest.approx(old_score, abs=1e-6)
    if task == "multilabel":  # the old buffer "thresholds" is the task's now, with its values
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]["thresholds"]
        assert torch.equal(cli.model.task.thresholds, saved)
        assert not torch.equal(saved, torch.full_like(saved, 0.5))  # picked on validation: the check can fail


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_old_checkpoints_predict_and_export(old_runs, task, tmp_path, monkeypatch):
    """An old checkpoint predicts new images and exports (checked against itself), with its thresholds."""
    monkeypatch.chdir(tmp_path)
    ckpt = best_checkpoint(old_runs / task)
    images = old_runs / task / ("photos/test/cat" if task == "multiclass" else "images")
    main(["predict", f"--data.predict_dir={images}", f"--ckpt_path={ckpt}", *QUIET])
    rows = list(csv.DictReader(next(tmp_path.glob("lightning_logs/version_*/predictions.csv")).open()))
    assert len(rows) == len(list(images.glob("*.png")))
    written = export.export(ckpt, tmp_path / "model.pt2")
    description = json.loads(Path(f"{written}.json").read_text())
    assert description["task"] == task and description["checked"]["max_probability_difference"] <= 1e-4
    if task == "multilabel":
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]["thresholds"]
        assert list(description["output"]["thresholds"].values()) == pytest.approx(saved.tolist())


def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # a Lightning checkpoint of another model
    for name, message in [
        ("missing.ckpt", "does not exist"),
        ("notes.ckpt", "is not a checkpoint saved by Lightning"),
        ("foreign.ckpt", "is not a checkpoint of transfer_lightning's TransferClassifier"),
    ]:
        with pytest.raises(UserInputError, match=message):
            checkpoints.read_checkpoint(tmp_path / name)


def test_compatibility_is_checked_on_the_settings_that_shape_the_weights():
    saved = {"backbone": "resnet18", "num_classes": 4, "freeze_backbone": True}
    checkpoints.check_compatible(saved, {**saved, "freeze_backbone": False}, resuming_fit=False)  # test, predict
    with pytest.raises(UserInputError, match="freeze_backbone=True"):
        checkpoints.check_compatible(saved, {**saved, "freeze_backbone": False}, resuming_fit=True)
    with pytest.raises(UserInputError, match="num_classes=4"):
        checkpoints.check_compatible(saved, {**saved, "num_classes": 5}, resuming_fit=False)
    with pytest.raises(UserInputError, match="task='multiclass'"):  # saved without a task: multiclass
        checkpoints.check_compatible(saved, {**saved, "task": "multilabel"}, resuming_fit=False)


def test_older_hyperparameters_are_read_as_this_version_means_them():
    old = {"hyper_parameters": {"backbone": "resnet18", "backbone_lr_scale": 0.1, "unfreeze_at_epoch": None}}
    assert checkpoints.model_hparams(old) == {
        "backbone": "resnet18",
        "backbone_lr_scale": None,
        "unfreeze_at_epoch": None,
        "task": "multiclass",
    }
    state = {"thresholds": torch.tensor([0.3]), "network.fc.bias": torch.zeros(1)}
    checkpoints.upgrade_state_dict(state)
    assert set(state) == {"task.thresholds", "network.fc.bias"}
