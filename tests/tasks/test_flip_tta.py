"""Flip test-time augmentation: the probabilities of each image and its mirror, averaged by the task."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import datamodule_for
from transfer_lightning.data.transforms import Preprocessing
from transfer_lightning.inference.export import ExportedClassifier, Outputs
from transfer_lightning.model import TransferClassifier
from transfer_lightning.training.feature_cache import FrozenFeatureCache


@pytest.mark.parametrize("settings", [{}, {"head": "mlp", "stage_features": ["layer2"]}], ids=["linear", "mlp-stages"])
def test_tta_flip_averages_the_probabilities_of_the_image_and_its_mirror(settings):
    torch.manual_seed(0)
    model = TransferClassifier(weights=None, num_classes=4, tta_flip=True, **settings).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = (model(images).softmax(-1) + model(images.flip(-1)).softmax(-1)) / 2
        got = model.evaluation_logits(images).softmax(-1)
        plain = TransferClassifier(weights=None, num_classes=4, **settings).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(plain.evaluation_logits(images), model(images))  # off: the plain logits
        energy = -(model(images).logsumexp(-1) + model(images.flip(-1)).logsumexp(-1)) / 2
        got_energy = model.task.unknown_scores(model.evaluation_logits(images))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(images).softmax(-1))
    torch.testing.assert_close(got_energy, energy)  # the unknown score: the mean energy of the image and its mirror

    # Exported models average the same way.
    preprocessing = Preprocessing((32, 32), "resize", None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    uint8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        exported = Outputs.of(ExportedClassifier(model.network, preprocessing, model.task, tta_flip=True).eval()(uint8))
        logits = model.evaluation_logits(preprocessing(uint8))
    torch.testing.assert_close(exported, Outputs(logits.softmax(-1), -logits.logsumexp(-1)))


def test_feature_cache_is_off_with_tta_flip(image_folder, tmp_path):
    model = TransferClassifier(weights=None, num_classes=4, freeze_backbone=True, tta_flip=True)
    assert "tta_flip" in FrozenFeatureCache().reason_not_to_cache(model, datamodule_for(image_folder, tmp_path))
