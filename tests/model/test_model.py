"""Freeze semantics, logged metrics against hand-computed ones, and checkpoint compatibility."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SGD, datamodule_for, head_state, make_trainer, prepared_by_hand
from transfer_lightning.errors import UserInputError
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.freezing import batchnorms


def backbone_state(model: TransferClassifier) -> dict[str, torch.Tensor]:
    """Every backbone tensor (weights and BatchNorm buffers), copied."""
    head = model.parts.head + "."
    return {k: v.clone() for k, v in model.network.state_dict().items() if not k.startswith(head)}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], running_stats: bool) -> set[str]:
    is_stat = lambda key: "running_" in key or "num_batches_tracked" in key  # noqa: E731
    return {k for k in before if is_stat(k) == running_stats and not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_frozen_backbone_is_bit_identical_after_training(image_folder, tmp_path, backbone):
    model = TransferClassifier(backbone=backbone, weights=None, num_classes=4, freeze_backbone=True, optimizer=SGD)
    backbone_before, head_before = backbone_state(model), head_state(model)
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))  # 6 steps over 2 epochs, with validation
    backbone_after = backbone_state(model)
    assert all(torch.equal(backbone_before[k], backbone_after[k]) for k in backbone_before)
    assert any(not torch.equal(head_before[k], v) for k, v in head_state(model).items())
    assert all(not bn.training for bn in batchnorms(model.network))


def test_update_bn_stats_lets_only_the_statistics_drift(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True, update_bn_stats=True, optimizer=SGD)
    before = backbone_state(model)
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))
    after = backbone_state(model)
    assert changed(before, after, running_stats=True)
    assert not changed(before, after, running_stats=False)


def test_fine_tuning_changes_the_backbone(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=False, optimizer=SGD)
    before = backbone_state(model)
    make_trainer(tmp_path).fit(model, datamodule_for(image_folder, tmp_path))
    after = backbone_state(model)
    assert changed(before, after, running_stats=False) and changed(before, after, running_stats=True)


def test_logged_test_accuracy_equals_accuracy_by_hand(image_folder, tmp_path):
    datamodule = datamodule_for(image_folder, tmp_path, normalization="cifar10")
    model = TransferClassifier(weights=None, num_classes=4, class_names=["cat", "dog", "frog", "ship"], optimizer=SGD)
    trainer = make_trainer(tmp_path)
    trainer.fit(model, datamodule)
    logged = trainer.test(model, datamodule)[0]

    model.eval()
    predictions, labels = [], []
    with torch.no_grad():
        for images, batch_labels in datamodule.test_dataloader():
            batch = prepared_by_hand(datamodule, images, image_size=None)
            predictions.append(model(batch).argmax(dim=1))
            labels.append(batch_labels)
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    assert len(labels) == 32
    assert logged["test/acc"] == pytest.approx((predictions == labels).float().mean().item(), abs=1e-6)
    for index, name in enumerate(model.class_names):
        of_class = labels == index
        by_hand = (predictions[of_class] == index).float().mean().item()
        assert logged[f"test/acc_{name}"] == pytest.approx(by_hand, abs=1e-6)


def test_checkpoint_of_another_backbone_or_class_count_is_refused(image_folder, tmp_path):
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(TransferClassifier(weights=None, num_classes=4, optimizer=SGD), datamodule)
    checkpoint = tmp_path / "resnet18.ckpt"
    trainer.save_checkpoint(checkpoint)

    other_backbone = TransferClassifier(backbone="mobilenet_v2", weights=None, num_classes=4)
    with pytest.raises(UserInputError, match="trained with backbone='resnet18'"):
        make_trainer(tmp_path).test(other_backbone, datamodule, ckpt_path=str(checkpoint))
    other_classes = TransferClassifier(weights=None, num_classes=5)
    with pytest.raises(UserInputError, match="trained with num_classes=4"):
        make_trainer(tmp_path).test(other_classes, datamodule, ckpt_path=str(checkpoint))


def test_resuming_with_other_optimizer_groups_is_refused_but_testing_is_not(image_folder, tmp_path):
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    trainer.fit(TransferClassifier(weights=None, num_classes=4, trainable_from="layer3", optimizer=SGD), datamodule)
    checkpoint = tmp_path / "partial.ckpt"
    trainer.save_checkpoint(checkpoint)

    whole = TransferClassifier(weights=None, num_classes=4, optimizer=SGD)
    with pytest.raises(UserInputError, match="trained with trainable_from='layer3'"):
        make_trainer(tmp_path, max_epochs=2).fit(whole, datamodule, ckpt_path=str(checkpoint))
    make_trainer(tmp_path, limit_test_batches=1).test(whole, datamodule, ckpt_path=str(checkpoint))


def test_class_names_must_match_num_classes():
    with pytest.raises(UserInputError, match="3 class_names given for num_classes=4"):
        TransferClassifier(weights=None, num_classes=4, class_names=["a", "b", "c"])
