"""Traps a user falls into, each through the command line: exit 2 and one line, or an explicit log line.

Nothing is written or downloaded by a command that stops: no run folder, no ./data.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import CLASSES, write_image_folder
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.data.listing import IMAGE_EXTENSIONS, LeftOut
from transfer_lightning.model import TransferClassifier

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune_sgd.yaml"
FAST = ["--trainer.fast_dev_run=true"]


def stops(args: list[str], capsys, run_dir: Path) -> str:
    """Run the CLI, expecting exit 2 with one line on stderr and nothing written; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # not progress bars
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (run_dir / "lightning_logs").exists() and not (run_dir / "data").exists()
    return lines[0]


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download CIFAR-10 fails the test."""

    def download(*args, **kwargs):
        raise AssertionError("CIFAR-10 was downloaded")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", download)


def test_a_mistyped_data_dir_is_an_error_not_a_cifar10_download(small_run_args, run_dir, capsys, no_download):
    line = stops(
        ["fit", f"--config={CONFIG}", *small_run_args, f"--data.data_dir={run_dir / 'photoss'}"], capsys, run_dir
    )
    assert "photoss does not exist" in line and "leave it unset for CIFAR-10" in line


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_mistyped_ckpt_path_is_one_line(subcommand, small_run_args, run_dir, capsys):
    line = stops(
        [subcommand, f"--config={CONFIG}", *small_run_args, "--ckpt_path=lightning_logs/nope.ckpt"], capsys, run_dir
    )
    assert "Checkpoint lightning_logs/nope.ckpt does not exist" in line


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(subcommand, small_run_args, run_dir, capsys):
    line = stops([subcommand, f"--config={CONFIG}", *small_run_args], capsys, run_dir)
    assert f"{subcommand} scores a trained model: pass --ckpt_path" in line


@pytest.mark.parametrize(("backbone", "size"), [("googlenet", 64), ("inception_v3", 80)])
def test_networks_with_auxiliary_outputs_train_on_their_main_head(backbone, size, small_run_args, run_dir):
    args = [f"--config={CONFIG}", *small_run_args, f"--model.backbone={backbone}", f"--data.image_size={size}"]
    cli = TransferLightningCLI(args=["fit", *args, *FAST, "--data.batch_size=4", "--test_after_fit=false"])
    assert cli.trainer.global_step == 1  # googlenet without weights returned GoogLeNetOutputs, which the loss refused
    auxiliary = {"googlenet": "aux1", "inception_v3": "AuxLogits"}[backbone]  # built only with aux_logits
    assert getattr(cli.model.network, auxiliary) is None


def test_backbone_lr_scale_without_unfreezing_is_an_error(small_run_args, run_dir, capsys):
    line = stops(["fit", f"--config={CONFIG}", *small_run_args, "--model.backbone_lr_scale=0.5"], capsys, run_dir)
    assert "backbone_lr_scale 0.5" in line and "unfreeze_at_epoch is not set" in line


def test_a_cosine_schedule_of_another_length_than_the_run_is_said_loudly(small_run_args, run_dir):
    scheduler = ["--model.scheduler=CosineAnnealingLR", "--model.scheduler.T_max=30"]
    with pytest.warns(UserWarning, match="T_max 30, but this run has 2 epochs.*stop short of eta_min.*T_max 2"):
        shrink = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
        main(["fit", f"--config={CONFIG}", *small_run_args, *scheduler, *shrink, "--test_after_fit=false"])


def test_a_val_size_larger_than_a_small_tree_says_what_to_set(small_run_args, run_dir, capsys):
    line = stops(["fit", f"--config={CONFIG}", *small_run_args, "--data.val_size=5000"], capsys, run_dir)
    assert "val_size 5000 holds out 5000 images" in line and "has 120" in line
    assert "set --data.val_size to a fraction such as 0.2, or a count below 120" in line


def rename_splits(root: Path, names: dict[str, str]) -> Path:
    for old, new in names.items():
        (root / old).rename(root / new)
    return root


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


def add_mac_and_windows_files(root: Path) -> None:
    """What copying from a Mac or unzipping a Mac's archive, and Windows' Explorer, leave behind."""
    for split in ("train", "test"):
        (root / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / split / "cat" / "._00000.png").write_bytes(b"\0\5\26\7 AppleDouble")
        (root / split / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (root / split / "dog" / "desktop.ini").write_text("[.ShellClassInfo]")
        (root / split / "__MACOSX" / "cat").mkdir(parents=True)
        (root / split / "__MACOSX" / "cat" / "._00000.png").write_bytes(b"\0\5\26\7 AppleDouble")


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


def test_trainable_from_freezes_the_parameters_outside_modules_too():
    """ViT's class token and position embedding belong to no module before the encoder layers."""
    model = TransferClassifier(
        backbone="vit_b_16", weights=None, num_classes=3, trainable_from="encoder.layers.encoder_layer_11"
    )
    network = model.network
    assert not network.class_token.requires_grad and not network.encoder.pos_embedding.requires_grad
    model(torch.rand(1, 3, 224, 224)).sum().backward()
    assert network.class_token.grad is None and network.encoder.pos_embedding.grad is None
    assert network.conv_proj.weight.grad is None and network.encoder.layers.encoder_layer_10.mlp[0].weight.grad is None
    assert network.encoder.layers.encoder_layer_11.mlp[0].weight.grad is not None
    trained = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert id(network.class_token) not in trained and id(network.heads.head.weight) in trained
