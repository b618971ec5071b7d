"""What a newcomer meets first: --help, --print_config, and a failed download that leaves nothing behind."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torchvision
import yaml
from lightning.pytorch.cli import LightningCLI

from transfer_lightning.commands.main import main
from transfer_lightning.commands.subcommands import SUBCOMMANDS
from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.data.cifar10 import download_cifar10
from transfer_lightning.errors import UserInputError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune_sgd.yaml"


def test_help_names_the_module_and_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m transfer_lightning ")
    assert "timm" in text and "Hugging Face Hub" in text
    # LightningCLI's private _add_subcommands gives them one-line help texts and lists our own subcommands.
    listed = re.search(r"\{([a-z_,]+)\}", text).group(1).split(",")
    assert sorted(listed) == sorted([*LightningCLI.subcommands(), *SUBCOMMANDS])
    for subcommand in listed:
        line = next(line for line in text.splitlines() if line.strip().startswith(subcommand + " "))
        assert len(line.split(maxsplit=1)) == 2, f"{subcommand} has no description"
    assert "``" not in text


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_listed_subcommand_runs_and_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m transfer_lightning {name}")


def test_export_help_names_every_format(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("onnx", "pt2", "hub", "--quantize", "int8"))


def test_print_config_has_the_optimizer_only_under_model(small_run_args, run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["fit", f"--config={CONFIG}", *small_run_args, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert "optimizer" not in config and "lr_scheduler" not in config
    assert config["model"]["optimizer"]["class_path"] == "torch.optim.SGD"


def test_print_config_without_a_subcommand_says_to_put_one_first(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--print_config"])
    assert exit_info.value.code == 2
    assert "Put a subcommand first: python -m transfer_lightning fit" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["default folder", "empty folder", "folder with a file"])
def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, where):
    def offline(url, root, filename=None, *args, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / (filename or "cifar-10-python.tar.gz")).write_bytes(b"half a download")
        raise urllib.error.URLError("no network")

    monkeypatch.chdir(tmp_path)
    # torchvision's downloader, not CIFAR10.__new__: a class's __new__ set and deleted again stays broken.
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    root = tmp_path / "new" / "data"
    if where != "default folder":
        root.mkdir(parents=True)
    if where == "folder with a file":
        (root / "mine.txt").write_text("the user's file")
        with pytest.raises(UserInputError, match="Offline.*configs/overrides/shared_mobilenet_v2.yaml"):
            download_cifar10(root)  # the data module never downloads into it (test_traps.py); the function cleans up
        assert [path.name for path in root.iterdir()] == ["mine.txt"]
        return
    datamodule = ImageFolderDataModule(data_dir=None if where == "default folder" else str(root))
    with pytest.raises(UserInputError, match="Offline.*configs/overrides/shared_mobilenet_v2.yaml"):
        datamodule.prepare_data()
    if where == "default folder":
        assert list(tmp_path.iterdir()) == []  # ./data, made by the attempt, is gone again
    else:
        assert list(root.iterdir()) == []
