"""The public Python API: the documented example (docs/guides/python-api.md) with a plain Trainer."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

import transfer_lightning
from transfer_lightning import TransferClassifier

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "python-api.md"


def test_the_documented_example_trains_with_a_plain_trainer(image_folder, tmp_path, monkeypatch):
    """The guide's first code block, run as it is on a tiny folder with random weights (whose frozen features
    still carry the images' colours) and more epochs: the model beats chance on the test images, scored by hand."""
    monkeypatch.chdir(tmp_path)
    example = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    example = example.replace('"photos"', repr(str(image_folder))).replace('weights="DEFAULT"', "weights=None")
    example = example.replace("max_epochs=3", "max_epochs=10, accelerator='cpu', enable_progress_bar=False")
    seed_everything(0)
    namespace: dict = {}
    exec(compile(example, str(GUIDE), "exec"), namespace)  # noqa: S102 - the documented code itself
    model, data = namespace["model"], namespace["data"]
    test_set = data.test_set
    images, labels = test_set.to_arrays()
    model.eval()
    with torch.no_grad():
        predicted = model(data.batch_transform(images, train=False)).argmax(dim=1)
    accuracy = float((predicted == labels).float().mean())
    assert accuracy > 0.6, accuracy  # 4 classes: chance is 0.25
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints").is_dir()


def test_the_package_top_holds_the_public_names():
    assert transfer_lightning.TransferClassifier is TransferClassifier
    assert {"ImageFolderDataModule", "TransferClassifier", "MulticlassTask", "MultilabelTask"} <= set(
        transfer_lightning.__all__
    )
