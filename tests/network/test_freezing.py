"""Frozen backbones: gradual unfreezing, partial fine-tuning from a module on, BatchNorm folded into frozen blocks."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.conftest import datamodule_for, make_trainer
from transfer_lightning.errors import UserInputError
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.freezing import FrozenBatchNorm, batchnorms, run_folded

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)


class FoldedForward(pl.Callback):
    """Records, per stage, which network modules run a replaced (BatchNorm-folded) forward."""

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}

    def record(self, stage: str, pl_module: TransferClassifier) -> None:
        replaced = {name for name, module in pl_module.network.named_modules() if "forward" in module.__dict__}
        self.seen.setdefault(stage, set()).update(replaced)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record("train", pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record("val", pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record("test", pl_module)


class RecordEpochs(pl.Callback):
    """Per training epoch: whether the backbone trains, its BatchNorm mode, and each group's learning rate."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            conv = pl_module.network.conv1.weight
            self.epochs[trainer.current_epoch] = {
                "trains": conv.requires_grad,
                "bn_training": pl_module.network.bn1.training,
                "lrs": {group["name"]: group["lr"] for group in trainer.optimizers[0].param_groups},
                "conv": conv.detach().clone(),
            }


def unfreezing_run(image_folder, tmp_path, max_epochs: int = 4, ckpt_path: str | None = None):
    pl.seed_everything(3)
    model = TransferClassifier(
        weights=None,
        num_classes=4,
        freeze_backbone=True,
        unfreeze_at_epoch=2,
        backbone_lr_scale=0.1,
        optimizer=SGD,
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    recorder = RecordEpochs()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(tmp_path, max_epochs=max_epochs, enable_checkpointing=True, limit_val_batches=1)
    trainer.callbacks.extend([recorder, checkpoints])
    trainer.fit(model, datamodule_for(image_folder, tmp_path), ckpt_path=ckpt_path)
    return model, recorder


def test_gradual_unfreezing_at_the_set_epoch_with_the_set_learning_rates(image_folder, tmp_path):
    model, record = unfreezing_run(image_folder, tmp_path)
    epochs = record.epochs
    assert [epochs[e]["trains"] for e in range(4)] == [False, False, True, True]
    assert [epochs[e]["bn_training"] for e in range(4)] == [False, False, True, True]
    for epoch in range(4):  # the same two groups throughout; the backbone at 0.1 x the head, both scheduled
        assert epochs[epoch]["lrs"] == pytest.approx({"head": 0.1 * 0.5**epoch, "backbone": 0.01 * 0.5**epoch})
    assert torch.equal(epochs[0]["conv"], epochs[2]["conv"])  # frozen until epoch 2
    assert not torch.equal(epochs[2]["conv"], epochs[3]["conv"])  # trained from epoch 2 on
    assert not torch.equal(epochs[3]["conv"], model.network.conv1.weight)


@pytest.mark.parametrize("checkpoint", ["epoch=0.ckpt", "epoch=2.ckpt"], ids=["before-unfreezing", "after"])
def test_resuming_continues_frozen_or_unfrozen_as_the_uninterrupted_run(image_folder, tmp_path, checkpoint):
    uninterrupted, full = unfreezing_run(image_folder, tmp_path / "full")
    resumed, rest = unfreezing_run(
        image_folder, tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "ckpt" / checkpoint)
    )
    first = int(checkpoint[6]) + 1
    assert sorted(rest.epochs) == list(range(first, 4))
    for epoch in rest.epochs:
        for key in ("trains", "bn_training"):
            assert rest.epochs[epoch][key] == full.epochs[epoch][key], (epoch, key)
        assert rest.epochs[epoch]["lrs"] == pytest.approx(full.epochs[epoch]["lrs"])
        torch.testing.assert_close(rest.epochs[epoch]["conv"], full.epochs[epoch]["conv"])
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_unfreezing_needs_a_frozen_backbone():
    with pytest.raises(UserInputError, match="freeze_backbone"):
        TransferClassifier(weights=None, unfreeze_at_epoch=2)


def module_state(model: TransferClassifier, prefix: str) -> dict[str, torch.Tensor]:
    """The weights and BatchNorm buffers of the network's modules named ``prefix...``, copied."""
    return {k: v.clone() for k, v in model.network.state_dict().items() if k.startswith(prefix)}


def test_trainable_from_freezes_the_modules_before_it(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, trainable_from="layer3", optimizer=SGD)
    assert model.frozen.always_frozen == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    early, late = module_state(model, "layer2"), module_state(model, "layer3")
    stem = module_state(model, "bn1")
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))

    # Before layer3 nothing moved, running statistics included (BatchNorm in eval mode); from it on all trained.
    for before, prefix in ((early, "layer2"), (stem, "bn1")):
        after = module_state(model, prefix)
        assert all(torch.equal(value, after[key]) for key, value in before.items()), prefix
    after = module_state(model, "layer3")
    assert all(not torch.equal(value, after[key]) for key, value in late.items() if "num_batches" not in key)
    assert not model.network.layer2[0].bn1.training and model.network.layer3[0].bn1.training
    optimized = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in optimized for p in model.network.layer2.parameters())


def test_modules_before_trainable_from_run_with_batchnorm_folded(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, trainable_from="layer3", optimizer=SGD)
    folded = FoldedForward()
    trainer = make_trainer(tmp_path, callbacks=[folded])
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer.fit(model, datamodule)
    trainer.test(model, datamodule)
    # layer1 and layer2 hold conv-BN pairs; conv1 and bn1 are separate modules, with nothing to fold inside.
    assert folded.seen == {stage: {"layer1", "layer2"} for stage in ("train", "val", "test")}
    assert not any("forward" in module.__dict__ for module in model.modules())  # undone after each stage

    # The folded forward computes the same function, and state_dict keys are untouched. Statistics
    # and affine parameters away from BatchNorm's initial identity, so that a wrong fold shows.
    generator = torch.Generator().manual_seed(0)
    for batchnorm in batchnorms(model.network):
        for tensor, (low, high) in zip(
            (batchnorm.running_mean, batchnorm.running_var, batchnorm.weight.data, batchnorm.bias.data),
            ((-1, 1), (0.5, 2), (0.5, 1.5), (-1, 1)),
            strict=True,
        ):
            tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    images = torch.rand(6, 3, 32, 32)
    model.eval()
    keys = model.state_dict().keys()
    with torch.no_grad():
        plain = model(images)
        FrozenBatchNorm().on_test_start(trainer, model)
        assert isinstance(model.network.layer1.forward.__self__, torch.fx.GraphModule)
        assert model.state_dict().keys() == keys
        torch.testing.assert_close(model(images), plain, rtol=1e-4, atol=1e-5)
        FrozenBatchNorm().on_test_end(trainer, model)


def test_folding_again_folds_the_current_weights():
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    images = torch.rand(2, 3, 8, 8)
    run_folded([block])
    block[1].running_mean.fill_(1.0)  # e.g. weights loaded after a stage that ended in an error
    run_folded([block])
    torch.testing.assert_close(block(images), torch.nn.Sequential.forward(block, images), rtol=1e-4, atol=1e-5)


def test_no_folding_while_frozen_batchnorm_statistics_move(image_folder, tmp_path):
    model = TransferClassifier(
        weights=None, num_classes=4, trainable_from="layer3", update_bn_stats=True, optimizer=SGD
    )
    folded = FoldedForward()
    make_trainer(tmp_path, callbacks=[folded]).fit(model, datamodule_for(image_folder, tmp_path))
    assert folded.seen["train"] == set()


def test_gradual_unfreezing_stops_at_trainable_from(image_folder, tmp_path):
    model = TransferClassifier(
        weights=None, num_classes=4, freeze_backbone=True, unfreeze_at_epoch=1, trainable_from="layer4", optimizer=SGD
    )
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))
    assert all(p.requires_grad for p in model.network.layer4.parameters())
    assert not any(p.requires_grad for p in model.network.layer3.parameters())
    assert [bn.training for bn in (model.network.layer3[1].bn2, model.network.layer4[0].bn1)] == [False, True]
    groups = {group["name"]: group["params"] for group in model.trainer.optimizers[0].param_groups}
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.network.layer4.parameters()}


def test_bad_trainable_from_is_a_clear_error():
    with pytest.raises(UserInputError, match="'layer5' is not a module of the network. Did you mean layer4"):
        TransferClassifier(weights=None, trainable_from="layer5")
    with pytest.raises(UserInputError, match="freeze_backbone: true trains only the head"):
        TransferClassifier(weights=None, freeze_backbone=True, trainable_from="layer4")


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
