"""--data.exclude and --data.relabel: the images an audit's CSV names are left out of, or relabelled in, what fit
trains on (counted in the data), and the settings travel with the run."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, write_image_folder
from transfer_lightning.commands.main import main
from transfer_lightning.data import ImageFolderDataModule


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images", train_per_class=10, test_per_class=3)


def data(folder: Path, tmp_path: Path, **edits) -> ImageFolderDataModule:
    module = ImageFolderDataModule(data_dir=str(folder), cache_dir=str(tmp_path / "cache"), val_size=0, **edits)
    module.prepare_data()
    module.setup("fit")
    return module


def names_and_labels(dataset) -> dict[str, int]:
    return dict(zip(dataset.image_names(), dataset.labels.tolist(), strict=True))


def test_exclude_leaves_out_flagged_rows_and_the_second_of_each_duplicate_pair(folder, tmp_path, caplog):
    plain = names_and_labels(data(folder, tmp_path).train_set)
    issues = write_csv(
        tmp_path / "label_issues.csv",
        ["path", "split", "given_label", "suggested_label", "label_quality", "is_issue"],
        [
            ["train/cat/00000.png", "train", "cat", "dog", "0.01", "true"],
            ["train/dog/00001.png", "train", "dog", "dog", "0.9", "false"],
        ],
    )
    caplog.set_level(logging.INFO)
    edited = names_and_labels(data(folder, tmp_path, exclude=str(issues)).train_set)
    assert set(plain) - set(edited) == {str(folder / "train" / "cat" / "00000.png")}  # only the flagged row
    assert "1 images left out (--data.exclude)" in caplog.text
    pairs = write_csv(
        tmp_path / "duplicates.csv",
        ["path_a", "split_a", "path_b", "split_b", "similarity", "kind"],
        [["train/cat/00002.png", "train", "test/cat/00000.png", "test", "1.0", "exact"]],
    )
    module = data(folder, tmp_path, exclude=str(pairs))
    assert str(folder / "test" / "cat" / "00000.png") not in module.test_set.image_names()
    assert str(folder / "train" / "cat" / "00002.png") in module.train_set.image_names()  # one copy stays


def test_relabel_changes_the_labels_trained_on(folder, tmp_path):
    edits = write_csv(tmp_path / "fix.csv", ["path", "label"], [["train/cat/00000.png", "frog"]])
    module = data(folder, tmp_path, relabel=str(edits))
    labels = names_and_labels(module.train_set)
    assert module.class_names[labels[str(folder / "train" / "cat" / "00000.png")]] == "frog"
    counts = torch.bincount(module.train_set.labels, minlength=4).tolist()
    assert counts[module.class_names.index("cat")] == 9 and counts[module.class_names.index("frog")] == 11
    assert (
        names_and_labels(data(folder, tmp_path).train_set)[str(folder / "train" / "cat" / "00000.png")] == 0
    )  # shared store untouched


def test_fit_keeps_the_edits_in_its_config_and_checkpoint(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exclude = write_csv(
        tmp_path / "outliers.csv",
        ["path", "split", "score", "is_outlier"],
        [["train/dog/00003.png", "train", "0.9", "true"]],
    )
    args = [
        f"--data.data_dir={folder}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--data.exclude={exclude}",
        "--data.val_size=0.2",
    ]
    main(["fit", *args, "--model.weights=null", "--trainer.max_epochs=1", "--test_after_fit=false", *QUIET])
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert f"exclude: {exclude}" in config
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert checkpoint["datamodule_hyper_parameters"]["exclude"] == str(exclude)


@pytest.mark.parametrize(
    "option, content, message",
    [
        ("exclude", "file,x\na,b\n", "needs a path column"),
        ("relabel", "path\ntrain/cat/00000.png\n", "needs a label column"),
        ("relabel", "path,label\ntrain/cat/00000.png,zebra\n", "names class 'zebra'"),
        ("exclude", "path\nnowhere/else.png\n", "No image of the data is named"),
    ],
)
def test_bad_edit_files_are_one_line(folder, tmp_path, run_dir, capsys, option, content, message):
    edits = tmp_path / "edits.csv"
    edits.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                f"--data.data_dir={folder}",
                f"--data.{option}={edits}",
                "--data.val_size=0.2",
                "--model.weights=null",
                *QUIET,
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not list(run_dir.rglob("*.ckpt")) and not list(run_dir.rglob("config.yaml"))  # nothing written


def test_parquet_images_are_named_by_their_file_and_row(tmp_path):
    """What audit's CSVs and --data.exclude call an image of a Parquet set: its file and row."""
    from tests.data.test_parquet import write_hub_parquet
    from transfer_lightning.data.edits import image_name

    write_hub_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", 6, seed=0)
    module = ImageFolderDataModule(parquet=str(tmp_path / "data"), val_size=4, cache_dir=str(tmp_path / "cache"))
    module.prepare_data()
    module.setup("fit")
    names = {image_name(name, module.source.names_root) for name in module.train_set.image_names()}
    assert len(names) == 20 and all(name.startswith("images/train-00000-of-00001-000000") for name in names)
    first = sorted(names)[0]
    edits = write_csv(tmp_path / "drop.csv", ["path"], [[first]])
    module = ImageFolderDataModule(
        parquet=str(tmp_path / "data"), val_size=4, cache_dir=str(tmp_path / "cache"), exclude=str(edits)
    )
    module.prepare_data()
    module.setup("fit")
    assert len(module.train_set) + len(module.val_set) == 23
