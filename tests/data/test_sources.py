"""Sources as objects: the factory picks one kind per data setting, each says its classes, task and pools, and
``optimize`` splits a source with the data module's own policy without building a DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import CLASSES, write_photo_folder, write_tagged_table
from transfer_lightning.commands.main import main
from transfer_lightning.data import decode_image, open_source
from transfer_lightning.data.cifar10 import Cifar10Source
from transfer_lightning.data.folders import FolderSource
from transfer_lightning.data.splits import make_splits
from transfer_lightning.data.streaming import open_split
from transfer_lightning.data.table_source import TableSource
from transfer_lightning.errors import UserInputError


def test_the_factory_picks_one_kind_per_setting(image_folder, cifar_batches, tmp_path):
    folders = open_source(str(image_folder), cache_dir=str(tmp_path))
    assert isinstance(folders, FolderSource) and folders.class_names == CLASSES and folders.task == "multiclass"
    assert "class folders under" in folders.describe() and "train/, test/" in folders.describe()
    table = write_tagged_table(tmp_path / "tagged", train=12, val=4, test=4)
    tagged = open_source(labels_file=str(table), images_dir=str(table.parent / "images"), cache_dir=str(tmp_path))
    assert isinstance(tagged, TableSource) and tagged.task == "multilabel"
    assert [len(pool) for pool in tagged.sample_pools()[:3]] == [12, 4, 4]
    cifar = open_source(str(cifar_batches), cache_dir=str(tmp_path))
    assert isinstance(cifar, Cifar10Source) and len(cifar.class_names) == 10
    with pytest.raises(UserInputError, match="No data in"):
        open_source(str(tmp_path / "tagged" / "images"), download=False, cache_dir=str(tmp_path))


def test_one_split_policy_for_file_lists_and_decoded_pools(image_folder, tmp_path):
    """make_splits over the listed samples and over the decoded store puts the same images in each split."""
    source = open_source(str(image_folder), cache_dir=str(tmp_path))
    listed = make_splits(source.sample_pools(), 20, 0, source.root)
    decoding = ((32, 32), "bilinear", None)
    source.prepare(decoding, 20)
    decoded = make_splits(source.pools(decoding), 20, 0, source.root)
    assert listed.description == decoded.description
    for files, images in zip(listed[:3], decoded[:3], strict=True):
        by_file = torch.stack([torch.from_numpy(decode_image(path, *decoding)) for path, _ in files])
        assert torch.equal(by_file, images.to_arrays().images)
        assert torch.equal(files.labels, images.labels)
    assert listed.test_is_val is False and listed.val_is_test is False


def test_optimize_needs_no_datamodule_and_resizes_as_asked(tmp_path, monkeypatch):
    pytest.importorskip("litdata", reason="the stream extra is not installed")
    photos = write_photo_folder(tmp_path / "photos", {"train": 6, "val": 2})

    def no_datamodule(*args, **kwargs):
        raise AssertionError("optimize built a DataModule")

    monkeypatch.setattr("transfer_lightning.data.module.open_source", no_datamodule)  # what its constructor calls
    output = tmp_path / "optimized"
    main(["optimize", "--workers=1", f"--data.data_dir={photos}", "--data.image_size=24", "--interpolation=bicubic",
          f"--data.cache_dir={tmp_path / 'cache'}", "--encoding=raw", f"--output={output}"])  # fmt: skip
    info = json.loads((output / "transfer_lightning.json").read_text())
    sizes = {"train": len(_files(photos / "train")), "val": len(_files(photos / "val"))}
    assert (info["interpolation"], info["size"], info["split_sizes"]) == ("bicubic", [27, 27], sizes)
    assert "class folders under" in info["source"]
    stored = open_split(str(output), "val", False, 0, "1GB", None, tmp_path)
    expected = {decode_image(path, (27, 27), "bicubic", 24).tobytes() for path in _files(photos / "val")}
    assert {stored[i][0].numpy().tobytes() for i in range(len(stored))} == expected


def _files(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*") if path.is_file())
