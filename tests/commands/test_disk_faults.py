"""Faults of the disk, through the CLI: a full disk, damaged caches, and damaged files a user gives. Each is one
line and exit 2, or a self-repair said in one line after which the run trains; never a traceback, and nothing
half-written or temporary left behind."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from transfer_lightning.commands.main import main
from transfer_lightning.data import store
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import temporary_path
from transfer_lightning.inference import export
from transfer_lightning.serving.requests import load_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_adam.yaml"
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--test_after_fit=false"]


def run(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of the command line."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *phrases: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(phrase in lines[0] for phrase in phrases), lines[0]


def no_temporary_files(root: Path) -> bool:
    return not [path for path in root.rglob("*") if path.name.endswith(".tmp")]


needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def small_disk(run_dir: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted in the test's folder: a real disk that fills (ENOSPC)."""
    disk = run_dir / "small_disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # the event writer may hold a file open


def cut_short(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as file:
        file.truncate(int(path.stat().st_size * keep))


def test_too_little_free_space_for_the_store_stops_before_writing(small_run_args, run_dir, capsys, monkeypatch):
    """120 images of 32x32 need about 1.4 MB with the margin; the disk says 600 KB are free."""
    free = shutil._ntuple_diskusage(10**9, 10**9 - 600_000, 600_000)
    monkeypatch.setattr("transfer_lightning.files.shutil.disk_usage", lambda path: free)
    code, err = run(["fit", f"--config={CONFIG}", *small_run_args, *SHORT], capsys)
    assert_one_line(code, err, "needs 1.", "600 KB is free", "--data.cache_dir")
    assert not list((run_dir / "cache").glob("*x*")) and no_temporary_files(run_dir)


@needs_root
def test_a_disk_that_fills_while_the_store_is_written_is_one_line(small_run_args, run_dir, capsys, monkeypatch):
    """A real ENOSPC: the store goes to a 200 KB tmpfs, past the space check (as when another program fills the
    disk meanwhile). The space is reserved before the memory-mapped writes, so it is an error, not a SIGBUS."""
    with small_disk(run_dir, "200k") as disk:
        monkeypatch.setattr(store, "check_free_space", lambda *args: None)
        code, err = run(["fit", f"--config={CONFIG}", *small_run_args, f"--data.cache_dir={disk}", *SHORT], capsys)
        assert_one_line(code, err, "The disk filled while writing", "--data.cache_dir")
        assert list(disk.iterdir()) == []  # nothing left to keep the disk full


def test_a_damaged_store_is_built_again(small_run_args, run_dir, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert run(["fit", f"--config={CONFIG}", *small_run_args, *SHORT], capsys)[0] == 0
    (images,) = (run_dir / "cache").glob("train-*/images.npy")
    cut_short(images)  # a copy that was cut, a disk that filled
    code, err = run(["fit", f"--config={CONFIG}", *small_run_args, *SHORT], capsys)
    assert code == 0, err
    assert "is damaged (images.npy holds" in caplog.text and "building it again" in caplog.text
    assert store.store_damage(images.parent) is None


def test_a_damaged_feature_file_is_computed_again(small_run_args, run_dir, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert run(["fit", f"--config={CONFIG}", *small_run_args, *SHORT], capsys)[0] == 0
    stored = sorted((run_dir / "cache" / "features").glob("*.pt"))
    assert len(stored) == 2  # train and val
    cut_short(stored[0])
    code, err = run(["fit", f"--config={CONFIG}", *small_run_args, *SHORT], capsys)
    assert code == 0, err
    assert f"{stored[0]} is damaged" in caplog.text and "computing the features again" in caplog.text
    assert len(torch.load(stored[0], weights_only=True)["features"]) > 0  # stored whole again


def test_leftovers_of_a_killed_run_are_removed_and_said(small_run_args, run_dir, capsys, caplog):
    caplog.set_level(logging.INFO)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = int(finished.stdout)  # a process that is gone, as a killed run's is
    leftover = (run_dir / "cache" / f".photos-1234-32x32.pid{killed}-abc123.tmp").resolve()
    leftover.mkdir(parents=True)
    (leftover / "images.npy").write_bytes(bytes(1000))
    running = temporary_path(run_dir / "cache" / "other")  # this process's: being written, so it stays
    running.write_bytes(b"")
    assert run(["fit", f"--config={CONFIG}", *small_run_args, *SHORT], capsys)[0] == 0
    assert not leftover.exists() and running.exists()
    assert "Removed 1 temporary file(s) of earlier runs" in caplog.text and leftover.name in caplog.text


@pytest.fixture
def checkpoint(small_run_args, run_dir, capsys) -> Path:
    args = ["fit", f"--config={CONFIG}", *small_run_args, "--trainer.max_steps=1", "--test_after_fit=false"]
    assert run(args, capsys)[0] == 0
    return next(run_dir.rglob("last.ckpt"))


def test_a_damaged_checkpoint_is_one_line(checkpoint, small_run_args, capsys):
    cut_short(checkpoint)
    code, err = run(["test", f"--config={CONFIG}", *small_run_args, f"--ckpt_path={checkpoint}"], capsys)
    assert_one_line(code, err, str(checkpoint), "damaged", "cut short")
    code, err = run(["fit", f"--config={CONFIG}", *small_run_args, "--ckpt_path=last", *SHORT], capsys)
    assert_one_line(code, err, "last.ckpt", "damaged")  # resuming from the damaged last.ckpt


def test_a_damaged_weights_file_is_one_line(small_run_args, run_dir, capsys):
    weights = run_dir / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(), weights)
    cut_short(weights, keep=0.3)
    args = ["fit", f"--config={CONFIG}", *small_run_args, "--model.backbone=mobilenet_v2", f"--model.weights={weights}"]
    code, err = run([*args, *SHORT], capsys)
    assert_one_line(code, err, str(weights), "cut short")


def test_a_damaged_exported_model_is_one_line(checkpoint, run_dir):
    written = export.export(checkpoint, run_dir / "model.pt2")
    cut_short(written)
    with pytest.raises(UserInputError, match="cannot be read: cut short by a copy or a full disk"):
        load_model(None, str(written), "cpu")


@needs_root
def test_a_disk_that_fills_while_a_checkpoint_is_written_is_one_line(small_run_args, run_dir, capsys):
    """The run folder on a 2 MB tmpfs: the event files fit, ResNet18's checkpoint (about 45 MB) does not."""
    with small_disk(run_dir, "2m") as disk:
        logs = [f"--trainer.logger.init_args.save_dir={disk}", "--trainer.max_steps=1", "--test_after_fit=false"]
        code, err = run(["fit", f"--config={CONFIG}", *small_run_args, *logs], capsys)
        assert_one_line(code, err, "the disk filled while writing into", "small_disk")
        assert not list(disk.rglob("*.ckpt")) and no_temporary_files(disk)


@needs_root
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(checkpoint, run_dir, capsys):
    with small_disk(run_dir, "1m") as disk:
        code, err = run(["export", f"--ckpt_path={checkpoint}", f"--output={disk / 'model.pt2'}"], capsys)
        assert_one_line(code, err, "the disk filled while writing into", "small_disk")
        assert list(disk.iterdir()) == []  # neither the model nor its .json, nor a temporary file
