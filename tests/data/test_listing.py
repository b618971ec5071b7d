"""What a folder tree is read as: split folders under their common names, hidden and system files, files by
extension, HEIC photos. Each through the command line: one line, or an explicit log line."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import CLASSES, FINETUNE_SGD, stops, write_image_folder
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.data.listing import IMAGE_EXTENSIONS, LeftOut

CONFIG = FINETUNE_SGD
FAST = ["--trainer.fast_dev_run=true"]


def rename_splits(root: Path, names: dict[str, str]) -> Path:
    for old, new in names.items():
        (root / old).rename(root / new)
    return root


def add_mac_and_windows_files(root: Path) -> None:
    """What copying from a Mac or unzipping a Mac's archive, and Windows' Explorer, leave behind."""
    for split in ("train", "test"):
        (root / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / split / "cat" / "._00000.png").write_bytes(b"\0\5\26\7 AppleDouble")
        (root / split / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (root / split / "dog" / "desktop.ini").write_text("[.ShellClassInfo]")
        (root / split / "__MACOSX" / "cat").mkdir(parents=True)
        (root / split / "__MACOSX" / "cat" / "._00000.png").write_bytes(b"\0\5\26\7 AppleDouble")


@pytest.mark.parametrize(
    "names", [{"train": "training_set", "test": "test_set"}, {"train": "Train", "test": "Validation"}]
)
def test_kaggle_style_split_folders_are_splits_not_classes(names, tmp_path, small_run_args, run_dir, caplog):
    root = rename_splits(write_image_folder(tmp_path / "kaggle", train_per_class=6, test_per_class=2), names)
    args = [f"--config={CONFIG}", *small_run_args, f"--data.data_dir={root}", "--data.val_size=4"]
    with caplog.at_level(logging.INFO):
        cli = TransferLightningCLI(args=["fit", *args, *FAST, "--test_after_fit=false"])
    assert cli.datamodule.class_names == CLASSES  # not "test_set vs training_set"
    held_out = "Validation" not in names.values()  # without a val folder, val_size images are held out of train
    assert f"train = {root / names['train']} ({20 if held_out else 24} images)" in caplog.text


def test_split_folders_under_unknown_names_are_refused(tmp_path, small_run_args, run_dir, capsys):
    root = rename_splits(
        write_image_folder(tmp_path / "parts", train_per_class=3, test_per_class=1), {"train": "part1", "test": "part2"}
    )
    line = stops(["fit", f"--config={CONFIG}", *small_run_args, f"--data.data_dir={root}"], capsys, run_dir)
    assert "(part1, part2) hold only folders (cat, dog, frog, ship)" in line and "looks like split folders" in line


def test_mac_and_windows_files_are_skipped_and_counted(tmp_path, small_run_args, run_dir, caplog):
    root = write_image_folder(tmp_path / "copied", train_per_class=6, test_per_class=2)
    add_mac_and_windows_files(root)
    args = [f"--config={CONFIG}", *small_run_args, f"--data.data_dir={root}", "--data.val_size=4"]
    with caplog.at_level(logging.INFO):
        cli = TransferLightningCLI(args=["fit", *args, *FAST, "--test_after_fit=false"])
    assert cli.datamodule.class_names == CLASSES  # no __MACOSX class
    assert len(cli.datamodule.train_set) + len(cli.datamodule.val_set) == 24
    assert f"Left out under {root / 'train'}: 3 hidden or system files" in caplog.text


def test_a_class_folder_with_only_hidden_files_is_an_error(tmp_path, small_run_args, run_dir, capsys):
    root = write_image_folder(tmp_path / "copied", train_per_class=3, test_per_class=1)
    for split in ("train", "test"):
        (root / split / "zebra").mkdir()
        (root / split / "zebra" / "._00000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    line = stops(["fit", f"--config={CONFIG}", *small_run_args, f"--data.data_dir={root}"], capsys, run_dir)
    assert "No image in the class folder(s) zebra" in line


def test_files_not_read_are_counted_by_extension_and_gif_avif_are_read(tmp_path, small_run_args, run_dir, caplog):
    root = write_image_folder(tmp_path / "phone", train_per_class=6, test_per_class=2)
    picture = Image.new("RGB", (32, 32), (200, 30, 30))
    picture.save(root / "train" / "cat" / "extra.gif")
    (root / "train" / "cat" / "notes.txt").write_text("taken at the zoo")
    (root / "train" / "dog" / "raw.cr2").write_bytes(b"II*\0 raw camera file")
    expected = 25
    if ".avif" in IMAGE_EXTENSIONS:
        picture.save(root / "train" / "dog" / "extra.avif")
        expected += 1
    args = [f"--config={CONFIG}", *small_run_args, f"--data.data_dir={root}", "--data.val_size=4"]
    with caplog.at_level(logging.INFO):
        cli = TransferLightningCLI(args=["fit", *args, *FAST, "--test_after_fit=false"])
    assert len(cli.datamodule.train_set) + len(cli.datamodule.val_set) == expected
    assert "2 files that are not images it reads (1 .txt, 1 .cr2)" in caplog.text


def test_heic_photos_need_the_heif_extra_and_are_read_with_it(tmp_path):
    line = LeftOut(by_extension=Counter({".heic": 3})).describe(tmp_path)
    assert "3 .heic" in line and "[heif] extra" in line
    if ".heic" not in IMAGE_EXTENSIONS:
        pytest.skip("the [heif] extra (pillow-heif) is not installed")
    from transfer_lightning.data import decode_image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "iphone.heic")
    pixels = decode_image(str(tmp_path / "iphone.heic"))
    assert pixels.shape == (3, 30, 40) and abs(int(pixels[0, 5, 5]) - 200) <= 4
