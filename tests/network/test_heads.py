"""model.head mlp and model.adapt_bn_stats: trained on stored features with the backbone run once, the same answers
through predict, export and serve, and BatchNorm statistics that are those of the training images by hand."""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import PHOTO_CLASSES, QUIET, datamodule_for, eval_pixels, fit_in, make_trainer, write_photo_folder
from transfer_lightning import checkpoints
from transfer_lightning.commands.main import main
from transfer_lightning.errors import UserInputError
from transfer_lightning.inference import export
from transfer_lightning.interpretation.cam import find_cam_layer
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.heads import ConcatPool2d, MLPHead
from transfer_lightning.training.feature_cache import FrozenFeatureCache


def backbone_state(model: TransferClassifier) -> dict[str, torch.Tensor]:
    block = model.parts.classifier_block + "."
    return {name: value.clone() for name, value in model.network.state_dict().items() if not name.startswith(block)}


def test_concat_pooling_is_the_average_and_the_maximum_of_each_channel():
    maps = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5).sin()
    pooled = ConcatPool2d()(maps).flatten(1)
    means = [[float(maps[n, c].mean()) for c in range(3)] for n in (0, 1)]
    by_hand = [mean + [float(maps[n, c].max()) for c in range(3)] for n, mean in enumerate(means)]
    torch.testing.assert_close(pooled, torch.tensor(by_hand), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone, pooled", [("mobilenet_v2", 2 * 1280), ("resnet18", 2 * 512)])
def test_the_mlp_head_is_fastais_on_both_poolings_and_grad_cam_still_finds_the_map(backbone, pooled):
    model = TransferClassifier(backbone, None, num_classes=3, head="mlp", freeze_backbone=True)
    assert isinstance(model.head, MLPHead) and model.parts.head == model.parts.classifier_block
    assert (model.head.in_features, model.head.out_features) == (pooled, 3)
    layers = [type(layer).__name__ for layer in model.head]
    assert layers == ["Flatten", "BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"network.{model.parts.head}.{name}" for name, _ in model.head.named_parameters()
    }
    model.train()  # the head's BatchNorm trains; the frozen backbone's stays in eval mode
    assert all(layer.training for layer in model.head if isinstance(layer, torch.nn.BatchNorm1d))
    assert not any(layer.training for layer in model.frozen.batchnorms())
    assert (
        find_cam_layer(model.network.eval(), torch.rand(1, 3, 64, 64))
        == {
            "mobilenet_v2": "features.18",
            "resnet18": "layer4",
        }[backbone]
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backbone": "vit_b_16", "head": "mlp"}, "pools it where it cannot be replaced"),
        ({"head": "mlp", "freeze_backbone": True, "head_solver": "lbfgs"}, "lbfgs fits a linear head"),
        ({"head": "two_layers"}, "head must be linear or mlp"),
        ({"adapt_bn_stats": True}, "set freeze_backbone true"),
        ({"adapt_bn_stats": True, "freeze_backbone": True, "update_bn_stats": True}, "update_bn_stats false"),
    ],
)
def test_heads_and_adaptation_that_cannot_work_are_refused(settings, message):
    with pytest.raises(UserInputError, match=message):
        TransferClassifier(weights=None, num_classes=3, **settings)


def test_the_mlp_head_trains_on_stored_features_and_the_backbone_runs_once(image_folder, tmp_path):
    model = TransferClassifier("resnet18", None, num_classes=4, head="mlp", freeze_backbone=True)
    before, head_before = backbone_state(model), {k: v.clone() for k, v in model.head.state_dict().items()}
    images_through_backbone = []
    model.network.conv1.register_forward_hook(lambda module, args, output: images_through_backbone.append(len(output)))
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=None)
    trainer.callbacks.append(FrozenFeatureCache(store=False, engine="torch"))
    trainer.fit(model, datamodule)
    # 100 training and 20 validation images once each for 3 epochs of the head; 1: the input-size check's blank image
    assert sum(images_through_backbone) == 1 + 100 + 20
    assert all(torch.equal(value, model.network.state_dict()[name]) for name, value in before.items())
    assert all(not torch.equal(value, model.head.state_dict()[name]) for name, value in head_before.items())


def test_adapted_statistics_are_those_of_the_training_images_by_hand(image_folder, tmp_path):
    """bn1 sees conv1 of the normalised training images; layer1.0.bn1 what the stem gives in training mode (each batch
    normalised by its own statistics), computed here with functional calls; weights stay bit-identical."""
    model = TransferClassifier("resnet18", None, num_classes=4, freeze_backbone=True, adapt_bn_stats=True)
    parameters = {name: value.clone() for name, value in model.network.named_parameters() if not name.startswith("fc.")}
    datamodule = datamodule_for(image_folder, tmp_path)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.callbacks.append(FrozenFeatureCache(store=False, engine="torch"))
    trainer.fit(model, datamodule)

    net = model.network
    first, second = [], []
    with torch.no_grad():
        for chunk, _ in datamodule.train_set.batches(datamodule.hparams.batch_size):
            images = datamodule.batch_transform(chunk, train=False)
            stem = net.conv1(images)
            first.append(stem)
            normalised = F.batch_norm(stem, None, None, net.bn1.weight, net.bn1.bias, training=True)
            second.append(net.layer1[0].conv1(F.max_pool2d(F.relu(normalised), 3, 2, 1)))
    for layer, inputs in ((net.bn1, first), (net.layer1[0].bn1, second)):
        values = torch.cat(inputs).double().transpose(0, 1).flatten(1)  # channels x (images * pixels)
        torch.testing.assert_close(layer.running_mean.double(), values.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), values.var(1), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(value, dict(net.named_parameters())[name]) for name, value in parameters.items())


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory):
    """A random-weight ResNet18 with the mlp head on adapted statistics and on layer2's features too
    (model.stage_features), fitted frozen on photos at 32 px."""
    root = tmp_path_factory.mktemp("mlp")
    photos = write_photo_folder(root / "photos", {"train": 12, "val": 4}, classes=PHOTO_CLASSES)
    args = [f"--data.data_dir={photos}", f"--data.cache_dir={root / 'cache'}", "--data.image_size=32"]
    args += ["--data.batch_size=16", "--model.weights=null", "--model.head=mlp", "--model.freeze_backbone=true"]
    args += ["--model.adapt_bn_stats=true", "--model.stage_features=[layer2]", "--trainer.max_epochs=2"]
    args += ["--test_after_fit=false", *QUIET]
    fit_in(root, args)
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", photos / "train"


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the [export] extra is not installed")
@pytest.mark.skipif(importlib.util.find_spec("litserve") is None, reason="the [serve] extra is not installed")
def test_the_mlp_head_answers_alike_through_predict_export_and_serve(trained_mlp, run_dir):
    checkpoint, photos = trained_mlp
    files = sorted(path for path in photos.rglob("*.jpg"))[:6]
    main(["predict", f"--ckpt_path={checkpoint}", f"--data.predict_dir={photos}", *QUIET])
    (csv_file,) = run_dir.glob("lightning_logs/version_*/predictions.csv")
    written = {row["path"]: row for row in csv.DictReader(csv_file.open())}
    predicted = torch.tensor(
        [[float(written[str(f.relative_to(photos))][f"top{k}_probability"]) for k in (1, 2, 3)] for f in files]
    )
    prep = checkpoints.preprocessing(checkpoints.read_checkpoint(checkpoint), "last.ckpt")
    images = torch.stack([eval_pixels(path, prep) for path in files])
    for format in ("onnx", "pt2"):
        output = run_dir / f"model.{format}"
        main(["export", f"--ckpt_path={checkpoint}", f"--output={output}"])
        exported = export.run_exported(output, format, images).probabilities
        torch.testing.assert_close(exported.sort(dim=1, descending=True).values, predicted, atol=1e-4, rtol=0)

    from transfer_lightning.serving.api import ClassifierAPI

    args = {"ckpt_path": str(checkpoint), "model": None, "max_image_mb": 1, "max_megapixels": 1, "top_k": 3}
    api = ClassifierAPI(argparse.Namespace(**args, max_batch_size=1))
    api.setup("cpu")
    request = {"images": [base64.b64encode(path.read_bytes()).decode() for path in files]}
    served = api.encode_response(api.predict(api.decode_request(request)))["predictions"]
    by_server = torch.tensor([[entry["probability"] for entry in answer["top_k"]] for answer in served])
    torch.testing.assert_close(by_server, predicted, atol=1e-4, rtol=0)


def test_a_timm_backbone_pools_both_ways_and_the_hub_format_refuses_the_mlp_head():
    pytest.importorskip("timm", reason="the [timm] extra is not installed")
    from transfer_lightning.inference.hub import timm_classifier

    model = TransferClassifier("timm/resnet10t", None, num_classes=3, head="mlp", freeze_backbone=True).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.network.body.forward_features(images)
    torch.testing.assert_close(model.classifier_inputs(images), ConcatPool2d()(maps).flatten(1), atol=1e-5, rtol=0)
    assert model.head.in_features == 2 * maps.shape[1]
    with pytest.raises(UserInputError, match="--format onnx or pt2"):
        timm_classifier(model.network)
