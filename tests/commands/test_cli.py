"""The real command line on every config: runs, logs, checkpoints, optimizer settings, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from tests.conftest import SHARED_MOBILENET, assert_test_scores_by_hand
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.reporting.runs import read_run

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
# The overrides of the reference configs; shared_efficientnet_lite0.yaml goes with the timm recipes (tests/network).
OVERRIDES = [path for path in sorted((CONFIGS[0].parent / "overrides").glob("*.yaml")) if "lite0" not in path.stem]
REFERENCE_CONFIGS = ["finetune_sgd", "finetune_adam", "feature_extractor_sgd", "feature_extractor_adam"]


def custom_scalars_layout(run: Path) -> layout_pb2.Layout:
    """The Custom Scalars layout written into a run's event files."""
    for events in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    return layout_pb2.Layout.FromString(value.tensor.string_val[0])
    raise AssertionError(f"no custom scalars layout in {run}")


def test_the_four_reference_configs_exist():
    assert set(REFERENCE_CONFIGS) <= {config.stem for config in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_config_runs_fast_dev_run_and_trainer_uses_its_optimizer(config, small_run_args, run_dir):
    cli = TransferLightningCLI(args=["fit", f"--config={config}", *small_run_args, "--trainer.fast_dev_run=true"])
    wanted = yaml.safe_load(config.read_text())["model"]

    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == wanted["optimizer"]["class_path"].rsplit(".", 1)[1]
    for key, value in wanted["optimizer"]["init_args"].items():
        assert optimizer.param_groups[0][key] == value
    scheduler = cli.trainer.lr_scheduler_configs[0]
    assert type(scheduler.scheduler).__name__ == wanted["scheduler"]["class_path"].rsplit(".", 1)[1]
    assert scheduler.interval == "epoch"
    for key, value in wanted["scheduler"]["init_args"].items():
        assert getattr(scheduler.scheduler, key) == value

    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    head_params = {id(p) for p in cli.model.head.parameters()}
    if wanted["freeze_backbone"]:
        assert optimized == head_params
    else:
        assert optimized == {id(p) for p in cli.model.parameters()}


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda path: path.stem)
def test_override_configs_apply_to_every_reference_config(override, small_run_args, run_dir):
    if "shared" in override.stem and not SHARED_MOBILENET.is_file():
        pytest.skip("../shared is absent")
    wanted = yaml.safe_load(override.read_text())["model"]
    for config in CONFIGS:
        # small_run_args come last and replace the data folder and weights, so only check the rest.
        args = ["fit", f"--config={config}", f"--config={override}", *small_run_args, "--trainer.fast_dev_run=true"]
        if "weights" in wanted:
            args.append(f"--model.weights={SHARED_MOBILENET}")
        cli = TransferLightningCLI(args=args)
        for key, value in wanted.items():
            if key != "weights":
                assert cli.model.hparams[key] == value


def test_num_classes_and_names_come_from_the_data(small_run_args, run_dir):
    cli = TransferLightningCLI(args=["fit", f"--config={CONFIGS[0]}", *small_run_args, "--trainer.fast_dev_run=true"])
    assert cli.model.hparams.num_classes == 4
    assert cli.model.head.out_features == 4
    assert cli.model.class_names == ["cat", "dog", "frog", "ship"]


def test_print_config_output_is_a_config_that_runs(small_run_args, run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS[0]}", *small_run_args, "--print_config"])
    assert exit_info.value.code == 0
    printed = run_dir / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "num_classes" not in yaml.safe_load(printed.read_text())["model"]  # linked, never typed
    main(["fit", f"--config={printed}", "--trainer.fast_dev_run=true"])


def test_fit_logs_checkpoints_and_tests_the_best(small_run_args, run_dir):
    args = [
        f"--config={CONFIGS[0].parent / 'feature_extractor_sgd.yaml'}",
        *small_run_args,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.log_every_n_steps=1",
    ]
    main(["fit", *args])
    version = run_dir / "lightning_logs" / "version_0"
    assert (version / "config.yaml").is_file()
    checkpoints = sorted(p.name for p in (version / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("best-epoch") for name in checkpoints)

    events = EventAccumulator(str(version)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_step", "train/acc_epoch", "val/acc", "val/loss", "lr-SGD", "test/acc", "test/acc_cat"} <= tags
    assert "test/confusion_matrix" in events.Tags()["images"]
    assert len(events.Scalars("val/acc")) == 2
    assert len(events.Scalars("train/images_per_sec")) == 2
    # Hyperparameters with results for TensorBoard's HParams tab, and no placeholder hp_metric.
    assert {"hparams/val_acc", "hparams/test_acc"} <= tags and "hp_metric" not in tags
    assert events.Scalars("hparams/test_acc")[-1].value == events.Scalars("test/acc")[-1].value
    hparams = read_run(version).hparams
    assert hparams["optimizer"] == "SGD" and hparams["backbone"] == "resnet18" and hparams["freeze_backbone"] == "true"
    assert hparams["batch_size"] == "16" and isinstance(hparams["lr"], float)  # read as written, not 16.000
    layout = custom_scalars_layout(version)
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts == {  # by name, as a reader of the dashboard sees them; each tag is one the run logged
        "loss (train, val)": ["train/loss_epoch", "val/loss"],
        "accuracy (train, val)": ["train/acc_epoch", "val/acc"],
        "learning rate": ["lr-.*"],
    }
    assert {"train/loss_epoch", "val/loss", "train/acc_epoch", "val/acc", "lr-SGD"} <= tags

    last = version / "checkpoints" / "last.ckpt"
    for subcommand in ("test", "validate", "predict"):
        main([subcommand, *args, f"--ckpt_path={last}"])
    assert (run_dir / "lightning_logs" / "version_3" / "config.yaml").is_file()

    rows = list(csv.DictReader((run_dir / "lightning_logs" / "version_3" / "predictions.csv").open()))
    assert len(rows) == 32 and sorted(int(row["index"]) for row in rows) == list(range(32))
    assert {row["true_class"] for row in rows} == {"cat", "dog", "frog", "ship"}
    test_acc = read_run(run_dir / "lightning_logs" / "version_1").scalars["test/acc"][-1]
    correct = sum(row["true_class"] == row["predicted_class"] for row in rows)
    assert correct / len(rows) == pytest.approx(test_acc, abs=1e-6)  # the same checkpoint, the same images


def test_offline_download_is_one_clear_error(small_run_args, run_dir, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", no_network)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS[0]}", *small_run_args, "--data.data_dir=null", "--trainer.fast_dev_run=true"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Could not download CIFAR-10" in error and "image-folder tree" in error
    assert not (run_dir / "data").exists()  # the default folder, made by the attempt, is removed again


def test_unknown_backbone_is_one_clear_error(small_run_args, run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS[0]}", *small_run_args, "--model.backbone=resnet19"])
    assert exit_info.value.code == 2
    assert "Unknown backbone 'resnet19'" in capsys.readouterr().err


def test_the_cifar10_download_format_runs(cifar_batches, small_run_args, run_dir):
    cli = TransferLightningCLI(
        args=[
            "fit",
            f"--config={CONFIGS[0]}",
            *small_run_args,
            f"--data.data_dir={cifar_batches}",
            "--trainer.fast_dev_run=true",
        ]
    )
    assert cli.model.head.out_features == 10
    assert cli.datamodule.class_names[:2] == ["airplane", "automobile"] and len(cli.datamodule.test_set) == 40
    assert_test_scores_by_hand(cli, batches=1)  # tested after fit, on fast_dev_run's one batch


def test_last_ckpt_is_the_last_epoch_even_when_validation_did_not_improve(small_run_args, run_dir):
    """A head that cannot learn (lr 1e-12) validates alike every epoch, so only epoch 0 is a best checkpoint;
    last.ckpt is still the last epoch's, which resuming from "last" relies on (Lightning 2.6 alone left epoch 0's)."""
    config = CONFIGS[0].parent / "feature_extractor_adam.yaml"
    args = [f"--config={config}", *small_run_args, "--trainer.max_epochs=3", "--model.optimizer.init_args.lr=1e-12"]
    main(["fit", *args, "--test_after_fit=false"])
    checkpoints = run_dir / "lightning_logs" / "version_0" / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    first = torch.load(best, weights_only=False)
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert (first["epoch"], last["epoch"], last["global_step"]) == (0, 2, 3 * first["global_step"])
