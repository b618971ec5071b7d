"""The frozen-feature cache gives what the uncached frozen path gives; speed flags run on CPU."""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator

from tests.conftest import SGD, assert_test_scores_by_hand, datamodule_for, head_state, make_trainer
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.errors import UserInputError
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.onnx import missing_onnx_packages
from transfer_lightning.training.feature_cache import FrozenFeatureCache

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_sgd.yaml"


class RecordInputs(pl.Callback):
    """Remembers whether training batches held cached features, and the validation accuracy."""

    def __init__(self) -> None:
        self.features_seen: set[bool] = set()
        self.test_features_seen: set[bool] = set()
        self.val_acc: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.features_seen.add(pl_module.inputs_are_features)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test_features_seen.add(pl_module.inputs_are_features)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def fit_frozen(
    image_folder, tmp_path, backbone: str, cache: bool, augment: bool = False, head: str = "linear", stages=None
):
    pl.seed_everything(7)
    model = TransferClassifier(
        backbone, None, num_classes=4, head=head, freeze_backbone=True, optimizer=SGD, stage_features=stages
    )
    datamodule = datamodule_for(image_folder, tmp_path, augment=augment)
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=None)
    trainer.callbacks.extend([FrozenFeatureCache(enabled=cache), recorder])
    trainer.fit(model, datamodule)
    return model, datamodule, recorder


# mobilenet_v2: dropout before the head; mlp: BatchNorm and dropout in the head, on average and max pooling, and
# with stage features (features.13's pooled outputs in each row too)
@pytest.mark.parametrize(
    "backbone, head, stages",
    [("resnet18", "linear", None), ("mobilenet_v2", "linear", None), ("mobilenet_v2", "mlp", ["features.13"])],
)
def test_cached_features_train_the_same_head_as_the_uncached_path(image_folder, tmp_path, backbone, head, stages):
    cached, datamodule, cached_record = fit_frozen(image_folder, tmp_path, backbone, True, head=head, stages=stages)
    plain, _, plain_record = fit_frozen(image_folder, tmp_path, backbone, False, head=head, stages=stages)
    assert cached_record.features_seen == {True} and plain_record.features_seen == {False}
    for key, value in head_state(cached).items():
        torch.testing.assert_close(value, head_state(plain)[key], atol=1e-4, rtol=1e-4)
    assert len(cached_record.val_acc) == 2
    for with_cache, without in zip(cached_record.val_acc, plain_record.val_acc, strict=True):
        assert abs(with_cache - without) <= 0.003
    # After fit the data module serves images again, and the model takes images.
    assert datamodule.train_set.arrays.images.dtype == torch.uint8 and len(datamodule.train_set) == 100
    assert not cached.inputs_are_features


def test_a_per_step_scheduler_trains_on_the_cached_features(image_folder, tmp_path):
    """OneCycleLR without total_steps asks the trainer for the run's steps in configure_optimizers, which builds the
    loader of training images before the cache replaces them (Lightning 2.6.6 keeps that loader otherwise)."""
    scheduler = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=None)
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True, scheduler=scheduler, head="mlp")
    model.hparams.scheduler_interval = "step"
    recorder = RecordInputs()
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=None, limit_val_batches=None)
    trainer.callbacks.extend([FrozenFeatureCache(store=False, engine="torch"), recorder])
    trainer.fit(model, datamodule_for(image_folder, tmp_path))
    assert recorder.features_seen == {True} and trainer.global_step == 2 * 7  # 100 images in batches of 16


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
    # The test score (features or images, either memory layout, bf16 or not) is the network's own on the test batch.
    assert_test_scores_by_hand(cli, batches=1, autocast="--trainer.precision=bf16-mixed" in flags)


@pytest.mark.slow
def test_torch_compile_flag_runs_on_cpu(small_run_args, run_dir):
    cli = TransferLightningCLI(
        args=["fit", f"--config={CONFIG}", *small_run_args, "--trainer.fast_dev_run=true", "--model.compile=true"]
    )
    assert_test_scores_by_hand(cli, batches=1)


def test_batches_are_pinned_only_for_a_gpu(image_folder, tmp_path):
    datamodule = datamodule_for(image_folder, tmp_path)
    datamodule.setup("fit")
    assert not datamodule.train_dataloader().pin_memory
    datamodule.trainer = SimpleNamespace(accelerator=CUDAAccelerator(), world_size=1, global_rank=0)
    assert datamodule.train_dataloader().pin_memory


def test_stored_features_are_reused_and_rebuilt_when_an_input_changes(image_folder, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    first, datamodule, first_record = fit_frozen(image_folder, tmp_path, "resnet18", cache=True)
    stored = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert len(stored) == 2  # train and val

    # A second run (another learning rate would do too) never touches the backbone.
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although the stored features fit")

    monkeypatch.setattr(FrozenFeatureCache, "compute", no_backbone)
    second, _, second_record = fit_frozen(image_folder, tmp_path, "resnet18", cache=True)
    assert "reusing the stored features of train_set" in caplog.text
    for key, value in head_state(first).items():
        torch.testing.assert_close(value, head_state(second)[key])
    assert second_record.val_acc == first_record.val_acc
    monkeypatch.undo()

    # The file name changes with the weights, the images of the split, and the transform.
    cache = FrozenFeatureCache()
    trainer = SimpleNamespace(precision="32-true")
    datamodule.setup("fit")
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True)
    base = cache.stored_path(model, datamodule, datamodule.train_set, trainer)
    other_weights = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True)
    assert cache.stored_path(other_weights, datamodule, datamodule.train_set, trainer) != base
    other_split = datamodule_for(image_folder, tmp_path, split_seed=1)
    other_split.setup("fit")
    assert cache.stored_path(model, other_split, other_split.train_set, trainer) != base
    other_transform = datamodule_for(image_folder, tmp_path, normalization="cifar10")
    other_transform.setup("fit")
    assert cache.stored_path(model, other_transform, other_transform.train_set, trainer) != base
    assert cache.stored_path(model, datamodule, datamodule.train_set, SimpleNamespace(precision="bf16-mixed")) != base
    assert FrozenFeatureCache(precision="bf16").stored_path(model, datamodule, datamodule.train_set, trainer) != base
    assert cache.stored_path(model, datamodule, datamodule.train_set, trainer) == base  # and only then


def test_bf16_features_are_close_to_fp32(image_folder, tmp_path):
    datamodule = datamodule_for(image_folder, tmp_path)
    datamodule.setup("fit")
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True).eval()
    trainer = SimpleNamespace(precision="32-true", is_global_zero=True)
    exact = FrozenFeatureCache(precision="fp32").compute(model, datamodule, datamodule.val_set, "val", trainer)
    fast = FrozenFeatureCache(precision="bf16").compute(model, datamodule, datamodule.val_set, "val", trainer)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # bf16 did run
    torch.testing.assert_close(fast, exact, atol=0.05 * exact.abs().max().item(), rtol=0.05)


def test_test_set_is_scored_on_features_and_given_back(image_folder, tmp_path):
    results, records = {}, {}
    for cache in (True, False):
        model, datamodule, _ = fit_frozen(image_folder, tmp_path, "resnet18", cache=cache)
        images_before = datamodule.test_set.arrays.images
        records[cache] = RecordInputs()
        trainer = make_trainer(tmp_path, callbacks=[FrozenFeatureCache(enabled=cache), records[cache]])
        results[cache] = trainer.test(model, datamodule, verbose=False)[0]
        assert datamodule.test_set.arrays.images is images_before and not model.inputs_are_features
    assert records[True].test_features_seen == {True} and records[False].test_features_seen == {False}
    assert results[True]["test/acc"] == pytest.approx(results[False]["test/acc"], abs=0.003)
    assert results[True]["test/loss"] == pytest.approx(results[False]["test/loss"], rel=1e-3)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3  # train, val and test


@pytest.mark.skipif(missing_onnx_packages(), reason="the [export] extra is not installed")
@pytest.mark.parametrize("old_exporter_fails", [False, True], ids=["torchscript-export", "torch.export-fallback"])
def test_onnxruntime_features_match_torch_and_get_their_own_file(
    image_folder, tmp_path, monkeypatch, old_exporter_fails
):
    real_export, exporters = torch.onnx.export, []

    def export(*args, dynamo: bool = True, **kwargs):
        exporters.append("torch.export" if dynamo else "torchscript")
        if old_exporter_fails and not dynamo:
            raise RuntimeError("an operator the TorchScript exporter does not know")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    datamodule = datamodule_for(image_folder, tmp_path)
    datamodule.setup("fit")
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True).eval()
    trainer = SimpleNamespace(precision="32-true", is_global_zero=True)
    torch_cache = FrozenFeatureCache(engine="torch", precision="fp32")
    onnx_cache = FrozenFeatureCache(engine="onnxruntime", precision="fp32")
    exact = torch_cache.compute(model, datamodule, datamodule.val_set, "val", trainer)
    fast = onnx_cache.compute(model, datamodule, datamodule.val_set, "val", trainer)
    assert exact.shape == fast.shape == (20, 512) and exact.abs().max() > 1
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=1e-4)
    assert exporters == (["torchscript", "torch.export"] if old_exporter_fails else ["torchscript"])
    stored = torch_cache.stored_path(model, datamodule, datamodule.val_set, trainer)
    assert onnx_cache.stored_path(model, datamodule, datamodule.val_set, trainer) != stored


def test_feature_engine_auto_and_its_errors(image_folder, tmp_path, monkeypatch):
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True)
    fp32, bf16 = SimpleNamespace(precision="32-true"), SimpleNamespace(precision="bf16-mixed")
    onnx_installed = not missing_onnx_packages()
    assert FrozenFeatureCache(engine="auto")._engine(model, fp32) == ("onnxruntime" if onnx_installed else "torch")
    assert FrozenFeatureCache(engine="auto")._engine(model, bf16) == "torch"  # onnxruntime runs fp32 only
    assert FrozenFeatureCache(engine="auto", precision="bf16")._engine(model, fp32) == "torch"
    if onnx_installed:
        with pytest.raises(UserInputError, match="--feature_cache.precision fp32"):
            FrozenFeatureCache(engine="onnxruntime")._engine(model, bf16)
    with pytest.raises(UserInputError, match="engine must be torch, onnxruntime or auto"):
        FrozenFeatureCache(engine="tensorrt")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real_find_spec(n))
    with pytest.raises(
        UserInputError, match=r"needs onnxruntime: install the export extra \(pip install -e '.\[export\]'\)"
    ):
        FrozenFeatureCache(engine="onnxruntime")
    assert FrozenFeatureCache(engine="auto")._engine(model, fp32) == "torch"


class KeepTrainingSet(pl.Callback):
    """The training set as the head trains on it (after the cache replaced it with features)."""

    def on_train_start(self, trainer, pl_module):
        self.train_set = trainer.datamodule.train_set.to_arrays()


def test_train_flips_add_the_mirror_images_features_as_rows(image_folder, tmp_path):
    """The head trains on the 100 training images' features, then those of their mirror images, computed
    here by hand; the mirrored features get a file of their own, and the unflipped ones keep theirs."""
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True, optimizer=SGD)
    datamodule = datamodule_for(image_folder, tmp_path)
    keep = KeepTrainingSet()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.callbacks.extend([FrozenFeatureCache(train_flips=True), keep])
    trainer.fit(model, datamodule)
    features, labels = keep.train_set
    images, image_labels = datamodule.train_set.to_arrays()
    inputs = datamodule.batch_transform(images, train=False)
    torch.testing.assert_close(features[:100], model.classifier_inputs(inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[100:], model.classifier_inputs(inputs.flip(-1)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[:100], features[100:], atol=1e-3)
    assert torch.equal(labels, torch.cat([image_labels, image_labels]))
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3  # train, mirrored train, val
    cache, precision = FrozenFeatureCache(), SimpleNamespace(precision="32-true")
    plain = cache.stored_path(model, datamodule, datamodule.train_set, precision)
    assert plain != cache.stored_path(model, datamodule, datamodule.train_set, precision, mirrored=True)
    assert plain.is_file()
