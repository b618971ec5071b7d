"""The frozen-feature cache gives what the uncached frozen path gives; speed flags run on CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator

from tests.test_model import SGD, datamodule_for, head_state, make_trainer
from transfer_lightning.cli import TransferLightningCLI
from transfer_lightning.features import FrozenFeatureCache
from transfer_lightning.model import TransferClassifier

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "feature_extractor_sgd.yaml"


class RecordInputs(pl.Callback):
    """Remembers whether training batches held cached features, and the validation accuracy."""

    def __init__(self) -> None:
        self.features_seen: set[bool] = set()
        self.val_acc: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.features_seen.add(pl_module.inputs_are_features)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def fit_frozen(image_folder, tmp_path, backbone: str, cache: bool, augment: bool = False):
    pl.seed_everything(7)
    model = TransferClassifier(backbone=backbone, weights=None, num_classes=4, freeze_backbone=True, optimizer=SGD)
    datamodule = datamodule_for(image_folder, tmp_path, augment=augment)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=None)
    trainer.callbacks.extend([FrozenFeatureCache(enabled=cache), recorder])
    trainer.fit(model, datamodule)
    return model, datamodule, recorder


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])  # mobilenet_v2: dropout before the head
def test_cached_features_train_the_same_head_as_the_uncached_path(image_folder, tmp_path, backbone):
    cached, datamodule, cached_record = fit_frozen(image_folder, tmp_path, backbone, cache=True)
    plain, _, plain_record = fit_frozen(image_folder, tmp_path, backbone, cache=False)
    assert cached_record.features_seen == {True} and plain_record.features_seen == {False}
    for key, value in head_state(cached).items():
        torch.testing.assert_close(value, head_state(plain)[key], atol=1e-4, rtol=1e-4)
    assert len(cached_record.val_acc) == 2
    for with_cache, without in zip(cached_record.val_acc, plain_record.val_acc, strict=True):
        assert abs(with_cache - without) <= 0.003
    # After fit the data module serves images again, and the model takes images.
    assert datamodule.train_set.arrays.images.dtype == torch.uint8 and len(datamodule.train_set) == 100
    assert not cached.inputs_are_features


def test_cache_is_off_with_augmentation_and_says_why(image_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _, _, record = fit_frozen(image_folder, tmp_path, "resnet18", cache=True, augment=True)
    assert record.features_seen == {False}
    assert "Frozen-feature cache off: random augmentation" in caplog.text


def test_cache_is_off_when_batchnorm_statistics_drift(image_folder, tmp_path):
    cache = FrozenFeatureCache()
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True, update_bn_stats=True)
    assert "update_bn_stats" in cache.reason_not_to_cache(model, datamodule_for(image_folder, tmp_path))
    fine_tuned = TransferClassifier(weights=None, num_classes=4)
    assert "trained" in cache.reason_not_to_cache(fine_tuned, datamodule_for(image_folder, tmp_path))


@pytest.mark.parametrize(
    "flags",
    [["--trainer.precision=bf16-mixed"], ["--model.channels_last=true"], ["--feature_cache.enabled=false"]],
    ids=["bf16-mixed", "channels_last", "no-feature-cache"],
)
def test_speed_flags_run_on_cpu(flags, small_run_args, run_dir):
    cli = TransferLightningCLI(
        args=["fit", f"--config={CONFIG}", *small_run_args, "--trainer.fast_dev_run=true", *flags]
    )
    assert 0 <= cli.trainer.callback_metrics["test/acc"] <= 1


@pytest.mark.slow
def test_torch_compile_flag_runs_on_cpu(small_run_args, run_dir):
    cli = TransferLightningCLI(
        args=["fit", f"--config={CONFIG}", *small_run_args, "--trainer.fast_dev_run=true", "--model.compile=true"]
    )
    assert 0 <= cli.trainer.callback_metrics["test/acc"] <= 1


def test_batches_are_pinned_only_for_a_gpu(image_folder, tmp_path):
    datamodule = datamodule_for(image_folder, tmp_path)
    datamodule.setup("fit")
    assert not datamodule.train_dataloader().pin_memory
    datamodule.trainer = SimpleNamespace(accelerator=CUDAAccelerator(), world_size=1, global_rank=0)
    assert datamodule.train_dataloader().pin_memory
