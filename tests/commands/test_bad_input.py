"""Each kind of bad input: exit status 2, one clear message, no traceback, nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import assert_test_scores_by_hand, write_image_folder
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune_sgd.yaml"


def broken_tree(root: Path, damage: str) -> Path:
    tree = write_image_folder(root / damage, train_per_class=3, test_per_class=1)
    if damage == "corrupt":
        (tree / "train" / "cat" / "00001.png").write_bytes(b"\x89PNG but not really")
    elif damage == "empty_class":
        (tree / "train" / "zebra").mkdir()
        (tree / "test" / "zebra").mkdir()
    elif damage == "class_mismatch":
        shutil.rmtree(tree / "test" / "dog")
    return tree


def weights_file(root: Path, kind: str) -> Path:
    path = root / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"these are not weights")
    else:
        torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


CASES = {
    "missing data_dir": (lambda tmp: ["--data.data_dir=does/not/exist"], "data.data_dir does/not/exist does not exist"),
    # Through LightningCLI's private _set_seed, which the CLI overrides: this fails if Lightning stops calling it.
    "seed out of range": (lambda tmp: ["--seed_everything=-1"], "seed_everything: -1 is not in bounds"),
    "corrupt image": (lambda tmp: [f"--data.data_dir={broken_tree(tmp, 'corrupt')}"], "Cannot decode image"),
    "empty class folder": (
        lambda tmp: [f"--data.data_dir={broken_tree(tmp, 'empty_class')}"],
        "Every class folder under",
    ),
    "train/test classes differ": (
        lambda tmp: [f"--data.data_dir={broken_tree(tmp, 'class_mismatch')}"],
        "different class folders",
    ),
    "weights not a state_dict": (
        lambda tmp: [f"--model.weights={weights_file(tmp, 'garbage')}"],
        "is not a state_dict",
    ),
    "weights of another architecture": (
        lambda tmp: [f"--model.weights={weights_file(tmp, 'mobilenet')}"],
        "does not fit backbone resnet18",
    ),
    "unknown optimizer": (lambda tmp: ["--model.optimizer=torch.optim.Adamm"], 'Parser key "model.optimizer"'),
    "unknown scheduler": (
        lambda tmp: ["--model.scheduler=torch.optim.lr_scheduler.StepLRR"],
        'Parser key "model.scheduler"',
    ),
    "zero batch size": (lambda tmp: ["--data.batch_size=0"], "batch_size must be at least 1"),
    "negative learning rate": (lambda tmp: ["--model.optimizer.lr=-0.1"], "rejected its arguments"),
    "zero learning rate": (lambda tmp: ["--model.optimizer.lr=0"], "learning rate must be positive"),
    "known_rate out of range": (lambda tmp: ["--model.known_rate=1.5"], "known_rate is the share of known images"),
    "val_size too large": (lambda tmp: ["--data.val_size=100000"], "set --data.val_size to a fraction"),
    "image too small for the backbone": (
        lambda tmp: ["--model.backbone=vit_b_16"],
        "vit_b_16 cannot take 32x32 images",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_clear_message(case, small_run_args, run_dir, capsys):
    make_args, message = CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIG}", *small_run_args, *make_args(run_dir), "--trainer.max_steps=2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 15, err
    assert not list(run_dir.rglob("*.ckpt")) and not list(run_dir.rglob("*.tmp"))


def test_checkpoint_of_another_class_count_exits_2(small_run_args, run_dir, cifar_batches, capsys):
    main(["fit", f"--config={CONFIG}", *small_run_args, "--trainer.max_steps=1", "--test_after_fit=false"])
    checkpoint = next(run_dir.rglob("last.ckpt"))  # 4 classes
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "test",
                f"--config={CONFIG}",
                *small_run_args,
                f"--data.data_dir={cifar_batches}",
                f"--ckpt_path={checkpoint}",
            ]
        )
    assert exit_info.value.code == 2
    assert "trained with num_classes=4" in capsys.readouterr().err


def test_a_checkpoint_brings_its_own_backbone_and_needs_no_weights_file(small_run_args, run_dir):
    weights = run_dir / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    main(["fit", f"--config={CONFIG}", *small_run_args, f"--model.weights={weights}", "--trainer.max_steps=1"])
    checkpoint = next(run_dir.rglob("last.ckpt"))
    weights.unlink()
    # LightningCLI takes the model's hyperparameters (resnet18) from the checkpoint.
    cli = TransferLightningCLI(
        args=[
            "test",
            f"--config={CONFIG}",
            *small_run_args,
            "--model.backbone=mobilenet_v2",
            f"--ckpt_path={checkpoint}",
        ]
    )
    assert cli.model.hparams.backbone == "resnet18"
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(value, weights[key]) for key, value in cli.model.state_dict().items())  # not pretrained
    assert_test_scores_by_hand(cli)


def test_atomic_path_replaces_whole_files_and_leaves_nothing_on_error(tmp_path):
    from transfer_lightning.files import atomic_path

    target = tmp_path / "out" / "report.md"
    with atomic_path(target) as partial:
        partial.write_text("first")
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]
