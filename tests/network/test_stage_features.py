"""model.stage_features: the head's input is the last pooled features and the named modules' pooled outputs, as
computed here module by module; cached, exported and served alike (the mlp fixture of test_heads.py has them)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from tests.conftest import datamodule_for, make_trainer
from transfer_lightning import checkpoints
from transfer_lightning.errors import UserInputError
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.heads import MLPHead
from transfer_lightning.training.feature_cache import FrozenFeatureCache


def average(maps: torch.Tensor) -> torch.Tensor:
    return maps.mean((2, 3))


def average_and_max(maps: torch.Tensor) -> torch.Tensor:
    return torch.cat([maps.mean((2, 3)), maps.amax((2, 3))], dim=1)


def resnet_inputs_by_hand(net: nn.Module, images: torch.Tensor, pool) -> torch.Tensor:
    """The last map pooled, then layer2's and layer3's: ResNet's forward written out."""
    stem = net.maxpool(net.relu(net.bn1(net.conv1(images))))
    second = net.layer2(net.layer1(stem))
    third = net.layer3(second)
    return torch.cat([pool(net.layer4(third)), pool(second), pool(third)], dim=1)


def mobilenet_inputs_by_hand(net: nn.Module, images: torch.Tensor, pool) -> torch.Tensor:
    """The last map pooled, then features.6's and features.13's: MobileNetV2's blocks run one by one."""
    maps = {}
    for index, block in enumerate(net.features[:19]):  # the mlp head appends its pooling as a 20th module
        images = maps[index] = block(images)
    return torch.cat([pool(maps[18]), pool(maps[6]), pool(maps[13])], dim=1)


@pytest.mark.parametrize(
    "backbone, stages, by_hand, widths",
    [
        ("resnet18", ["layer2", "layer3"], resnet_inputs_by_hand, (512, 128, 256)),
        ("mobilenet_v2", ["features.6", "features.13"], mobilenet_inputs_by_hand, (1280, 32, 96)),
    ],
)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_the_head_gets_the_last_and_the_named_stages_pooled_features(backbone, stages, by_hand, widths, head):
    torch.manual_seed(0)
    model = TransferClassifier(backbone, None, num_classes=3, head=head, freeze_backbone=True, stage_features=stages)
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = by_hand(model.network, images, average_and_max if head == "mlp" else average)
    inputs = model.classifier_inputs(images)
    torch.testing.assert_close(inputs, expected, atol=1e-5, rtol=1e-5)
    assert model.head.in_features == (2 if head == "mlp" else 1) * sum(widths)
    assert isinstance(model.head, MLPHead if head == "mlp" else nn.Linear)
    # The logits are the head's on exactly those inputs, so features cached from them give the same answers.
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.classifier_block(expected), atol=1e-5, rtol=1e-5)
    # Only the head trains; the backbone's modules keep their names (the checkpoint's keys, Grad-CAM's layers).
    trainable = {name for name, parameter in model.network.named_parameters() if parameter.requires_grad}
    assert trainable == {f"{model.parts.head}.{name}" for name, _ in model.head.named_parameters()}
    plain = TransferClassifier(backbone, None, num_classes=3, head=head)
    block = plain.parts.classifier_block + "."
    assert {k for k in model.network.state_dict() if not k.startswith(block)} == {
        k for k in plain.network.state_dict() if not k.startswith(block)
    }


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"stage_features": ["features.66"]}, "'features.66' is not a module of the network. Did you mean"),
        ({"backbone": "mobilenet_v3_small", "stage_features": ["features.3"]}, "pretrained layers before its head"),
        ({"backbone": "vit_b_16", "stage_features": ["encoder.layers.encoder_layer_3"]}, r"\(N, C, H, W\) maps"),
    ],
)
def test_stage_features_that_cannot_work_are_refused(settings, message):
    with pytest.raises(UserInputError, match=message):
        TransferClassifier(**{"backbone": "mobilenet_v2", "weights": None, "num_classes": 3, **settings})


def test_a_checkpoint_with_stage_features_is_refused_by_a_model_without():
    saved = {"backbone": "resnet18", "num_classes": 3, "stage_features": ["layer3"]}
    with pytest.raises(UserInputError, match="trained with stage_features=\\['layer3'\\]"):
        checkpoints.check_compatible(saved, {"backbone": "resnet18", "num_classes": 3, "stage_features": None}, False)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the [export] extra is not installed")
def test_stored_rows_hold_the_stage_features_computed_by_onnxruntime(image_folder, tmp_path):
    """onnxruntime computes the rows from a copy of the network (its hooks go with it); the cache checks them against
    torch, and here the stored file against the features by hand. Without stages the file has another name."""
    model = TransferClassifier("resnet18", None, num_classes=4, freeze_backbone=True, stage_features=["layer2"])
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer = make_trainer(tmp_path, max_epochs=2)
    cache = FrozenFeatureCache(engine="onnxruntime", cache_dir=str(tmp_path / "features"))
    trainer.callbacks.append(cache)
    trainer.fit(model, datamodule)
    stored = {path.name for path in (tmp_path / "features").glob("*.pt")}
    train_images = datamodule.train_set  # its images again after fit
    path = cache.stored_path(model, datamodule, train_images, trainer)
    assert path.name in stored
    rows = torch.load(path, weights_only=True)["features"]
    model.eval()
    first = datamodule.batch_transform(train_images.arrays.images[train_images.indices[:8]], train=False)
    with torch.no_grad():
        by_hand = resnet_inputs_by_hand(model.network, first, average)
    torch.testing.assert_close(rows[:8], by_hand[:, : 512 + 128], atol=1e-4, rtol=1e-4)  # layer3's columns left out
    plain = TransferClassifier("resnet18", None, num_classes=4, freeze_backbone=True)
    plain.network.load_state_dict(model.network.state_dict(), strict=False)  # the same backbone
    assert cache.stored_path(plain, datamodule, train_images, trainer) != path


def test_a_timm_backbone_takes_its_own_module_names():
    pytest.importorskip("timm", reason="the [timm] extra is not installed")
    from transfer_lightning.inference.hub import timm_classifier

    model = TransferClassifier("timm/resnet10t", None, num_classes=3, stage_features=["layer2"]).eval()
    body, images = model.network.body, torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        second = body.layer2(body.layer1(body.maxpool(body.act1(body.bn1(body.conv1(images))))))
        expected = torch.cat([average(body.layer4(body.layer3(second))), average(second)], dim=1)
    torch.testing.assert_close(model.classifier_inputs(images), expected, atol=1e-5, rtol=1e-5)
    assert model.parts.head == "head.block"
    with pytest.raises(UserInputError, match="model.stage_features: export it with --format onnx or pt2"):
        timm_classifier(model.network)
