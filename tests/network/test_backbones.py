"""Backbones by name, weights from torchvision names and local files, and their errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from tests.conftest import SHARED_MOBILENET, needs_shared
from transfer_lightning.errors import UserInputError
from transfer_lightning.network.backbones import create_network


@pytest.mark.parametrize(
    ("backbone", "head", "in_features"), [("resnet18", "fc", 512), ("mobilenet_v2", "classifier.1", 1280)]
)
def test_head_is_replaced(backbone, head, in_features):
    network, parts = create_network(backbone, None, 7)
    assert (parts.head, parts.classifier_block) == (head, head.split(".")[0])
    layer = network.get_submodule(head)
    assert (layer.in_features, layer.out_features) == (in_features, 7)
    assert network(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("with_classifier", [True, False])
def test_local_state_dict_is_loaded(tmp_path, with_classifier):
    source = torchvision.models.resnet18()
    state = source.state_dict()
    if not with_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    network, _ = create_network("resnet18", str(path), 3)
    loaded = network.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key


@needs_shared
def test_shared_mobilenet_v2_features_load():
    network, head = create_network("mobilenet_v2", str(SHARED_MOBILENET), 10)
    state = torch.load(SHARED_MOBILENET, weights_only=True)
    assert all(torch.equal(network.state_dict()[key], value) for key, value in state.items())
    assert head.head == "classifier.1"


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(
        UserInputError, match="does not fit backbone resnet18.*missing.*unexpected.*another architecture"
    ):
        create_network("resnet18", str(path), 10)


def test_weights_of_another_size_are_a_clear_error(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserInputError, match="does not fit backbone resnet18"):
        create_network("resnet18", str(path), 10)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage bytes", "is not a state_dict saved with torch.save"),
        ([1, 2, 3], "does not hold a state_dict"),
        ({"state_dict": {}, "epoch": 3}, "is a Lightning checkpoint"),
    ],
)
def test_files_that_are_not_state_dicts_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserInputError, match=message):
        create_network("resnet18", str(path), 10)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        create_network("resnet18", str(tmp_path / "nope.pth"), 10)


def test_unknown_backbone_and_weights_names_are_clear_errors():
    with pytest.raises(UserInputError, match="Unknown backbone 'resnet81'.*resnet18"):
        create_network("resnet81", None, 10)
    with pytest.raises(UserInputError, match="Unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        create_network("resnet18", "IMAGENET9K", 10)
    with pytest.raises(UserInputError, match="no Linear classifier"):
        create_network("squeezenet1_0", None, 10)


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserInputError) as error:
        create_network("resnet18", "DEFAULT", 10)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path) in message and "--model.weights" in message


def test_a_local_torchvision_weights_file_gets_the_classic_preprocessing(tmp_path):
    """A state_dict file says nothing of its training: the architecture's first ImageNet weights' recipe (for
    MobileNetV2 224 of 256, crop 0.875), not its later DEFAULT one (224 of 232)."""
    file = tmp_path / "weights.pth"
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(prefix="features."), file)
    _, local = create_network("mobilenet_v2", str(file), num_classes=3)
    assert local.preprocessing.crop_pct == pytest.approx(224 / 256)
    assert local.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    _, named = create_network("mobilenet_v2", None, num_classes=3)  # no weights: DEFAULT's recipe
    assert named.preprocessing.crop_pct == pytest.approx(224 / 232)
