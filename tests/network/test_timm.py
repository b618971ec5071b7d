"""timm backbones: names resolved once, weights from a Hub folder or a file (never silently random), the
weights' preprocessing carried through, every training mode through the CLI, layer-wise decay, the Hub export."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from safetensors.torch import load_file  # noqa: E402 - after the skip: the timm extra brings safetensors

from tests.conftest import DDP, SHARED, assert_test_scores_by_hand, run_cli, small_ddp_args, write_tagged_table  # noqa: E402  # noqa: E402
from transfer_lightning.commands.cli import TransferLightningCLI  # noqa: E402
from transfer_lightning.commands.main import main  # noqa: E402
from transfer_lightning.errors import UserInputError  # noqa: E402
from transfer_lightning.inference import export  # noqa: E402
from transfer_lightning.inference.hub import export_hub  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.network import create_network  # noqa: E402
from transfer_lightning.network.names import parse_backbone  # noqa: E402
from transfer_lightning.serving.requests import load_model  # noqa: E402
from transfer_lightning.training.feature_cache import FrozenFeatureCache  # noqa: E402

SHARED_LITE0 = SHARED / "weights" / "tf_efficientnet_lite0.in1k"
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
QUICK += ["--test_after_fit=false", "--model.optimizer=SGD", "--model.optimizer.lr=0.05"]


def save_timm_folder(folder: Path, architecture: str, **model_args) -> Path:
    """A random-weight timm model in the Hub's layout, written by timm's own save_for_hf, as a user's download."""
    from timm.models import save_for_hf

    torch.manual_seed(0)  # the same random weights whichever test makes the folder first
    model = timm.create_model(architecture, pretrained=False, **model_args)
    save_for_hf(model, str(folder), model_args=model_args or None, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def efficientnet_folder(tmp_path_factory) -> Path:
    """timm's test_efficientnet (356k parameters; its pretrained_cfg: ImageNet mean and std, bicubic, crop 0.95)."""
    return save_timm_folder(tmp_path_factory.mktemp("timm") / "test_efficientnet", "test_efficientnet")


@pytest.fixture(scope="session")
def dinov2_folder(tmp_path_factory) -> Path:
    """A DINOv2-style ViT with four register tokens, patch 14, shrunk to 2 blocks of width 32 (trained size 98)."""
    args = {"img_size": 98, "depth": 2, "embed_dim": 32, "num_heads": 2}
    return save_timm_folder(tmp_path_factory.mktemp("timm") / "dinov2", "vit_small_patch14_reg4_dinov2", **args)


def timm_args(small_run_args: list[str], folder: Path) -> list[str]:
    """The tiny-folder run arguments with the timm folder as backbone and its own weights."""
    kept = [arg for arg in small_run_args if not arg.startswith("--model.weights")]
    return [*kept, f"--model.backbone=local-dir:{folder}", "--model.weights=DEFAULT", "--data.normalization=auto"]


def run(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
        return 0, capsys.readouterr().err
    except SystemExit as exit_:
        return int(exit_.code), capsys.readouterr().err


# Names and weights ---------------------------------------------------------------------------------------------


def test_names_are_resolved_once_with_clear_errors(efficientnet_folder, tmp_path):
    assert parse_backbone("resnet18").library == "torchvision"
    assert parse_backbone("timm/convnext_tiny.fb_in22k").model == "convnext_tiny.fb_in22k"
    assert parse_backbone("hf-hub:timm/resnet18.a1_in1k@main").model == "hf-hub:timm/resnet18.a1_in1k@main"
    local = parse_backbone(f"local-dir:{efficientnet_folder}")
    assert local.library == "timm" and local.model == f"local-dir:{efficientnet_folder.resolve()}"
    with pytest.raises(UserInputError, match="Did you mean convnext_tiny"):
        parse_backbone("timm/convnext_tinny")
    with pytest.raises(UserInputError, match="config.json is missing"):
        parse_backbone(f"local-dir:{tmp_path}")
    with pytest.raises(UserInputError, match="hf-hub:ORG/NAME"):
        parse_backbone("hf-hub:resnet18")
    with pytest.raises(UserInputError, match="timm/NAME"):
        parse_backbone("vit_small_patch14_dinov2")  # timm's, not torchvision's: the message points at timm/NAME


def test_without_timm_a_timm_backbone_names_the_extra(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(UserInputError, match=r"pip install -e '\.\[timm\]'"):
        parse_backbone("timm/convnext_tiny")
    code, err = run(["backbones", "--library", "timm"], capsys)
    assert code == 2 and "timm extra" in err


def test_a_folder_and_a_weights_file_load_the_same_weights(efficientnet_folder):
    saved = load_file(efficientnet_folder / "model.safetensors")
    from_folder, parts = create_network(f"local-dir:{efficientnet_folder}", "DEFAULT", 5)
    weights_file = str(efficientnet_folder / "model.safetensors")
    by_name, _ = create_network("timm/test_efficientnet", weights_file, 5)
    for network in (from_folder, by_name):
        body = network.body.state_dict()
        assert all(torch.equal(body[key], saved[key]) for key in body)  # every body tensor is the file's
        assert network.head.out_features == 5
    random, _ = create_network("timm/test_efficientnet", None, 5)
    assert not torch.equal(random.body.conv_stem.weight, saved["conv_stem.weight"])
    config = timm.data.resolve_model_data_config(timm.create_model("test_efficientnet"))
    assert parts.preprocessing.mean == pytest.approx(config["mean"]) and parts.preprocessing.interpolation == "bicubic"
    assert parts.preprocessing.crop_pct == pytest.approx(config["crop_pct"])
    assert parts.preprocessing.input_size == config["input_size"][-1]


def test_offline_without_cached_weights_is_one_line_and_writes_nothing(
    small_run_args, run_dir, capsys, monkeypatch, tmp_path
):
    import huggingface_hub.constants

    # As a user's HF_HUB_OFFLINE=1 with an empty cache; huggingface_hub read the environment when it was imported.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    args = [a for a in small_run_args if not a.startswith("--model.weights")]
    code, err = run(["fit", *args, "--model.backbone=timm/test_efficientnet.r160_in1k", *QUICK], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--model.weights" in err and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert not (run_dir / "lightning_logs").exists()
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserInputError, match="neither DEFAULT"):
        create_network("timm/test_efficientnet", str(missing), 5)


def test_a_damaged_weights_file_is_one_line(efficientnet_folder, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((efficientnet_folder / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(UserInputError, match="Could not load the weights"):
        create_network("timm/test_efficientnet", str(cut), 5)


def test_backbones_lists_torchvision_and_timm_names(capsys):
    main(["backbones", "--filter", "*efficientnet_lite0*"])
    out = capsys.readouterr().out
    assert "timm/tf_efficientnet_lite0.in1k" in out and "efficientnet_b0" not in out
    main(["backbones", "--filter", "resnet1*", "--library", "torchvision"])
    assert re.search(r"^resnet18\b", capsys.readouterr().out, re.M)


def warm_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """The Hugging Face Hub cache as a download leaves it (refs/main -> snapshots/<commit>/), from a local folder."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())


def test_hub_models_load_offline_from_a_warm_cache_and_are_listed_as_cached(
    efficientnet_folder, tmp_path, monkeypatch, capsys
):
    """HF_HUB_OFFLINE=1 with the weights in the Hub cache: hf-hub:ORG/NAME and timm/NAME.TAG load them, and
    backbones --cached lists timm's name."""
    import huggingface_hub.constants

    cache = tmp_path / "hub_cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    warm_hub_cache(cache, "someone/tiny-efficientnet", efficientnet_folder)
    warm_hub_cache(cache, "timm/test_efficientnet.r160_in1k", efficientnet_folder)
    saved = load_file(efficientnet_folder / "model.safetensors")
    for name in ("hf-hub:someone/tiny-efficientnet", "timm/test_efficientnet.r160_in1k"):
        network, _ = create_network(name, "DEFAULT", 3)
        assert torch.equal(network.body.conv_stem.weight, saved["conv_stem.weight"]), name
    main(["backbones", "--filter", "test_efficientnet*", "--cached"])
    out = capsys.readouterr().out
    assert re.search(r"^timm/test_efficientnet\.r160_in1k\s+cached$", out, re.M)
    assert "1 with weights on this machine" in out


def test_the_store_size_follows_the_weights_crop_fraction(tmp_path, efficientnet_folder):
    """Photos of mixed sizes are stored at image_size / crop_pct: test_efficientnet's 0.95 gives 67 for 64,
    where the fixed ImageNet normalization keeps torchvision's 0.875 (73)."""
    from tests.conftest import write_photo_folder
    from transfer_lightning.data import ImageFolderDataModule

    photos = write_photo_folder(tmp_path / "photos", {"train": 4, "val": 2})
    model = TransferClassifier(f"local-dir:{efficientnet_folder}", num_classes=2)
    for normalization, side in (("auto", 67), ("imagenet", 73)):
        data = ImageFolderDataModule(
            data_dir=str(photos), image_size=64, normalization=normalization, cache_dir=str(tmp_path / "cache")
        )
        data.use_weights(model.weights_preprocessing)  # the handshake the CLI makes
        assert data.preprocessing.stored_size == (side, side) and data.view == "crop"


# Every mode through the CLI ------------------------------------------------------------------------------------


def test_fine_tuning_a_timm_backbone_scores_as_computed_by_hand(small_run_args, run_dir, efficientnet_folder):
    """The weights' preprocessing (auto) reaches the batches, the checkpoint and the scores; the test scores
    equal an independent computation with prepare_batch and the network."""
    args = timm_args(small_run_args, efficientnet_folder)
    cli = TransferLightningCLI(
        args=["fit", *args, "--data.image_size=48", "--trainer.max_epochs=3", "--model.optimizer=Adam"]
    )
    preparation = cli.datamodule.preparation
    config = timm.data.resolve_model_data_config(timm.create_model("test_efficientnet"))
    assert preparation.mean == pytest.approx(config["mean"]) and preparation.interpolation == "bicubic"
    assert_test_scores_by_hand(cli)
    assert cli.trainer.callback_metrics["test/acc"] > 0.5  # 4 colour classes: chance is 0.25
    checkpoint = torch.load(next(run_dir.rglob("last.ckpt")), weights_only=False)
    saved = checkpoint["ImageFolderDataModule"]["preprocessing"]
    assert saved["mean"] == pytest.approx(config["mean"]) and saved["interpolation"] == "bicubic"


def test_frozen_timm_backbone_uses_the_feature_cache_and_the_lbfgs_head(small_run_args, run_dir, efficientnet_folder):
    args = [*timm_args(small_run_args, efficientnet_folder), "--model.freeze_backbone=true", "--data.image_size=48"]
    cli = TransferLightningCLI(args=["fit", *args, "--model.head_solver=lbfgs", "--trainer.max_epochs=2"])
    cache = next(c for c in cli.trainer.callbacks if isinstance(c, FrozenFeatureCache))
    assert cache.enabled and list((Path(cli.datamodule.cache_dir) / "features").glob("*.pt"))
    body = cli.model.network.body
    assert not any(p.requires_grad for p in body.parameters())
    assert all(not m.training for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert_test_scores_by_hand(cli)  # the cached features gave the same scores as the images through the network


def test_gradual_unfreezing_from_a_timm_module_name(small_run_args, run_dir, efficientnet_folder):
    args = [*timm_args(small_run_args, efficientnet_folder), "--model.freeze_backbone=true", *QUICK]
    cli = TransferLightningCLI(
        args=["fit", *args, "--model.unfreeze_at_epoch=0", "--model.trainable_from=blocks.2", "--trainer.max_epochs=1"]
    )
    body = cli.model.network.body
    frozen = [name for name, p in body.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.")) for name in frozen)
    assert all(p.requires_grad for p in body.blocks[2].parameters()) and cli.model.network.head.weight.requires_grad


def test_multilabel_tta_and_ema_with_a_timm_backbone(tmp_path, run_dir, efficientnet_folder):
    table = write_tagged_table(tmp_path / "tagged", train=32, val=16, test=16)
    args = [f"--data.labels_file={table}", f"--data.images_dir={table.parent / 'images'}"]
    args += [f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_size=16", "--trainer.accelerator=cpu"]
    args += [f"--model.backbone=local-dir:{efficientnet_folder}", "--model.tta_flip=true", "--ema.enabled=true"]
    cli = TransferLightningCLI(args=["fit", *args, *QUICK, "--trainer.enable_progress_bar=false"])
    assert cli.model.task.name == "multilabel" and "val/mAP" in cli.trainer.callback_metrics


def test_a_dinov2_style_vit_at_another_size_with_its_tokens_frozen(small_run_args, run_dir, dinov2_folder):
    """Position embeddings resized to the data's size (98 -> 56: a 4x4 grid of patch 14); with trainable_from
    the class and register tokens and the position embedding stay frozen with the patch embedding."""
    args = [*timm_args(small_run_args, dinov2_folder), "--data.image_size=56", "--model.backbone_image_size=56"]
    args += ["--model.trainable_from=blocks.1", "--model.gradient_checkpointing=true", *QUICK]
    cli = TransferLightningCLI(args=["fit", *args, "--interpretation.enabled=false"])
    body = cli.model.network.body
    assert body.pos_embed.shape[1] == 16  # 4x4 patches, no prefix tokens in DINOv2's position embedding
    assert body.grad_checkpointing
    frozen = {name for name, p in body.named_parameters() if not p.requires_grad}
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight"} <= frozen
    assert not any(name.startswith("blocks.1.") for name in frozen)


def test_layer_decay_rates_are_applied_by_hand(efficientnet_folder):
    """Each parameter's rate is lr * 0.5 ** (layers above it), the layers counted here from the module
    names, not by timm: the stem, then each block (conv_head and bn2 with the last one, as timm's
    group_matcher says: MATCH_PREV_GROUP), then the new head."""
    model = TransferClassifier(f"local-dir:{efficientnet_folder}", num_classes=4, layer_decay=0.5)
    model.optimizer_factory = lambda groups: torch.optim.SGD(groups, lr=0.1)
    optimizer = model.configure_optimizers()
    blocks = [(i, j) for i, stage in enumerate(model.network.body.blocks) for j in range(len(stage))]
    head_layer = len(blocks) + 1

    def layer(name: str) -> int:
        if name.startswith(("body.conv_stem", "body.bn1")):
            return 0
        match = re.match(r"body\.blocks\.(\d+)\.(\d+)\.", name)
        if match:
            return 1 + blocks.index((int(match[1]), int(match[2])))
        return len(blocks) if name.startswith(("body.conv_head", "body.bn2")) else head_layer

    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.network.named_parameters():
        assert rate[id(parameter)] == pytest.approx(0.1 * 0.5 ** (head_layer - layer(name))), name
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.1)
    optimizer.step(), scheduler.step()  # torch's schedulers keep the ratios: they scale each group's own rate
    assert optimizer.param_groups[0]["lr"] / optimizer.param_groups[-1]["lr"] == pytest.approx(
        optimizer.param_groups[0]["lr_scale"] / optimizer.param_groups[-1]["lr_scale"]
    )
    with pytest.raises(UserInputError, match="timm backbone"):
        TransferClassifier("resnet18", weights=None, layer_decay=0.5).configure_optimizers()


# Export, the Hub folder, serving -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory, efficientnet_folder) -> Path:
    from tests.conftest import write_image_folder

    root = tmp_path_factory.mktemp("timm_run")
    folder = write_image_folder(root / "images", train_per_class=12, test_per_class=4)
    args = [f"--data.data_dir={folder}", f"--data.cache_dir={root / 'cache'}", "--data.val_size=8"]
    args += [f"--model.backbone=local-dir:{efficientnet_folder}", "--data.image_size=40", "--trainer.accelerator=cpu"]
    args += ["--trainer.enable_progress_bar=false", *QUICK[:-3], "--model.optimizer=Adam"]
    cwd = Path.cwd()
    os.chdir(root)  # lightning_logs/ goes here
    try:
        TransferLightningCLI(args=["fit", *args, "--interpretation.enabled=false"])
    finally:
        os.chdir(cwd)
    return next(root.rglob("last.ckpt"))


def test_hub_folder_reloads_in_timm_with_the_checkpoints_probabilities(timm_checkpoint, tmp_path):
    folder = export_hub(timm_checkpoint, tmp_path / "hub")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model, preprocessing = export.load_classifier(timm_checkpoint)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = preprocessing(export.example_images(preprocessing, 4, seed=3))
    with torch.no_grad():
        expected = model.network(images).softmax(-1)  # the checkpoint's network, not the export's check
        assert torch.allclose(reloaded(images).softmax(-1), expected, atol=1e-5)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 4
    assert config["label_names"] == model.class_names
    cfg = config["pretrained_cfg"]
    assert cfg["mean"] == pytest.approx(preprocessing.mean) and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == [3, 40, 40]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "image-classification" in card
    served = load_model(None, str(folder), "cpu")
    raw = export.example_images(preprocessing, 2, seed=4)
    logits = model.logits(preprocessing(raw))
    assert torch.allclose(served.run(raw).probabilities, model.task.probabilities(logits), atol=1e-5)
    assert torch.allclose(served.run(raw).unknown_scores, -logits.logsumexp(-1), atol=1e-4)  # the folder's rule too


def test_predict_with_a_hub_folder_gives_the_checkpoints_probabilities(timm_checkpoint, tmp_path, capsys):
    """predict --model DIR: each image's probability equals the checkpoint's, computed here from the file."""
    import csv

    from tests.conftest import eval_pixels

    folder = export_hub(timm_checkpoint, tmp_path / "hub")
    images = timm_checkpoint.parents[3] / "images" / "test"
    output = tmp_path / "predictions.csv"
    code, err = run(["predict", "--model", str(folder), f"--data.predict_dir={images}", f"--output={output}"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == len(list(images.rglob("*.png"))) == 16
    model, preprocessing = export.load_classifier(timm_checkpoint)
    for row in rows[:4]:
        batch = eval_pixels(images / row["path"], preprocessing)[None]
        with torch.no_grad():
            probabilities = model.task.probabilities(model.logits(preprocessing(batch)))[0]
        assert row["predicted_class"] == model.class_names[int(probabilities.argmax())]
        assert float(row["probability"]) == pytest.approx(float(probabilities.max()), abs=1e-4)


def test_hub_export_of_a_torchvision_model_or_into_a_full_folder_is_one_line(timm_checkpoint, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    code, err = run(
        ["export", f"--ckpt_path={timm_checkpoint}", "--format=hub", f"--output={tmp_path / 'taken'}"], capsys
    )
    assert code == 2 and "not an empty folder" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_LITE0.is_dir(), reason="../shared's EfficientNet-Lite0 is absent")
def test_the_real_efficientnet_lite0_loads_both_ways_and_gives_imagenet_classes():
    """Through local-dir: and by architecture name with the weights file: the same tensors, the same outputs."""
    folder, _ = create_network(f"local-dir:{SHARED_LITE0}", "DEFAULT", 10)
    named, parts = create_network("timm/tf_efficientnet_lite0", str(SHARED_LITE0 / "model.safetensors"), 10)
    assert parts.preprocessing.mean == (0.5, 0.5, 0.5) and parts.preprocessing.crop_pct == 0.875
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(folder.eval().body(images), named.eval().body(images), atol=1e-6)


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_onnx_and_pt2_exports_of_a_timm_model_are_checked_against_the_checkpoint(timm_checkpoint, tmp_path, format):
    if format == "onnx":
        pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    written = export.export(timm_checkpoint, tmp_path / f"model.{format}")
    description = json.loads(Path(f"{written}.json").read_text())
    assert (
        description["backbone"].startswith("local-dir:") and description["checked"]["max_probability_difference"] < 1e-4
    )
    assert description["inside_the_model"]["interpolation"] == "bicubic"  # the weights' own, from the checkpoint


def test_grad_cam_pictures_of_a_timm_convnet_and_a_clear_refusal_for_a_vit(timm_checkpoint, dinov2_folder):
    """fit wrote the top-loss pictures with Grad-CAM of the EfficientNet's last feature map; a ViT is refused."""
    from transfer_lightning.interpretation.cam import find_cam_layer

    model, _ = export.load_classifier(timm_checkpoint)
    assert find_cam_layer(model.network, torch.rand(1, 3, 40, 40)) == "body.bn2"  # conv_head's BatchNormAct2d
    vit, _ = create_network(f"local-dir:{dinov2_folder}", None, 3)
    with pytest.raises(UserInputError, match="vision transformer"):
        find_cam_layer(vit.eval(), torch.rand(1, 3, 98, 98))


def test_lr_find_and_a_sweep_that_chooses_the_backbone(small_run_args, run_dir, efficientnet_folder, capsys):
    pytest.importorskip("optuna", reason="the [tune] extra is not installed")
    args = [*timm_args(small_run_args, efficientnet_folder), "--data.image_size=40"]
    main(["lr_find", *args, "--num_training=20", "--early_stop_threshold=none"])
    assert re.search(r"Suggested learning rate: \S+", capsys.readouterr().out)
    space = run_dir / "space.yaml"
    space.write_text(f"model.backbone: [resnet18, local-dir:{efficientnet_folder}]\n")
    config = Path(__file__).resolve().parents[2] / "configs" / "feature_extractor_adam.yaml"
    sweep = [f"--config={config}", *args, "--model.weights=null", f"--sweep={space}", "--trials=2", "--seed=1"]
    main(["sweep", *sweep, "--pruner=none"])
    best = (run_dir / "lightning_logs" / "sweeps" / "sweep" / "best_config.yaml").read_text()
    assert "model:" in best and "backbone:" in best


@pytest.mark.slow  # 14 s: DDP is covered by tests/training/test_ddp.py; this adds timm's network to it
def test_ddp_with_a_timm_backbone(image_folder, tmp_path, efficientnet_folder):
    """Two CPU processes (Lightning's DDP launcher, gloo): fit and the test after it, with the folder's weights."""

    args = [*small_ddp_args(image_folder, tmp_path / "cache"), f"--model.backbone=local-dir:{efficientnet_folder}"]
    run_cli("fit", *args, "--model.weights=DEFAULT", "--data.image_size=40", *DDP, cwd=tmp_path)
    assert len(list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))) >= 1
    assert (tmp_path / "lightning_logs" / "version_0" / "classification_report.md").is_file()


# The recipes --------------------------------------------------------------------------------------------------

TIMM_RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "timm").glob("*.yaml"))


@pytest.mark.filterwarnings("ignore:model.scheduler .* has T_max")  # the recipes are cut to 2 epochs here
@pytest.mark.parametrize("recipe", TIMM_RECIPES, ids=lambda path: path.stem)
def test_timm_recipes_run_and_comment_every_setting(recipe, small_run_args, run_dir, tmp_path, request):
    """Each recipe with its backbone swapped for a small random timm model of the same family, on the CPU."""
    text = recipe.read_text()
    settings = [line for line in text.splitlines() if ":" in line and not line.lstrip().startswith("#")]
    assert not [line for line in settings if line.split(":", 1)[1].strip() and "#" not in line]
    if "dinov2" in text:
        folder = request.getfixturevalue("dinov2_folder")
        # A random ViT's features vary little between images: a weak L2 lets the head tell them apart.
        size = ["--data.image_size=56", "--model.backbone_image_size=56", "--model.lbfgs_l2=[1.0e-7, 1.0e-8]"]
    elif "convnext" in text:
        folder, size = save_timm_folder(tmp_path / "convnext", "test_convnext"), ["--data.image_size=64"]
    else:
        folder, size = request.getfixturevalue("efficientnet_folder"), ["--data.image_size=64"]
    shrink = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    shrink += ["--trainer.limit_test_batches=0.5", "--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    shrink += ["--model.scheduler.warmup_steps=1"] if "warmup_steps" in text else []
    shrink += ["--feature_cache.precision=fp32", "--feature_cache.engine=torch"] if "feature_cache" in text else []
    shrink += ["--model.stage_features=[blocks.3]"] if "stage_features" in text else []  # the small model has 5 blocks
    args = [*timm_args(small_run_args, folder), *size, *shrink, "--interpretation.cam=false"]
    cli = TransferLightningCLI(args=["fit", f"--config={recipe}", *args])
    assert cli.trainer.current_epoch == 2 and cli.model.parts.library == "timm"
    assert_test_scores_by_hand(cli, batches=1)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_LITE0.is_dir(), reason="../shared's EfficientNet-Lite0 is absent")
@pytest.mark.filterwarnings("ignore:model.scheduler .* has T_max")  # the recipes are cut to 1 epoch here
@pytest.mark.parametrize("recipe", [r for r in TIMM_RECIPES if "lite0" in r.stem], ids=lambda path: path.stem)
def test_the_shared_lite0_override_runs_the_lite0_recipes(recipe, small_run_args, tmp_path, monkeypatch):
    """The real weights through the override (whose paths are relative to the repository root), on the tiny
    folder: the real data is the docs' measurement."""
    repository = recipe.parents[2]
    monkeypatch.chdir(repository)
    override = repository / "configs" / "overrides" / "shared_efficientnet_lite0.yaml"
    shrink = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    shrink += ["--data.image_size=64", f"--trainer.logger.init_args.save_dir={tmp_path}", "--test_after_fit=false"]
    shrink += ["--model.scheduler.warmup_steps=1"] if "warmup" in recipe.read_text() else []
    kept = [arg for arg in small_run_args if not arg.startswith("--model.weights")]
    cli = TransferLightningCLI(args=["fit", f"--config={recipe}", f"--config={override}", *kept, *shrink])
    saved = load_file(SHARED_LITE0 / "model.safetensors")
    body = cli.model.network.body.state_dict()
    assert torch.equal(body["conv_stem.weight"], saved["conv_stem.weight"])  # frozen in every Lite0 recipe


@pytest.fixture(scope="module")
def timm_photo_checkpoint(tmp_path_factory, efficientnet_folder) -> Path:
    """A test_efficientnet (bicubic weights, crop 0.95) fitted on photos of mixed sizes at 40 px: stored at 42."""
    from tests.conftest import write_photo_folder

    root = tmp_path_factory.mktemp("timm_photos")
    folder = write_photo_folder(root / "photos", {"train": 6, "val": 2}, classes=("ants", "bees", "wasps"))
    args = [f"--data.data_dir={folder}", f"--data.cache_dir={root / 'cache'}", "--data.image_size=40"]
    args += [
        f"--model.backbone=local-dir:{efficientnet_folder}",
        "--data.normalization=auto",
        "--trainer.accelerator=cpu",
    ]
    args += ["--trainer.enable_progress_bar=false", *QUICK[:-3], "--model.optimizer=Adam"]
    cwd = Path.cwd()
    os.chdir(root)
    try:
        TransferLightningCLI(args=["fit", *args, "--interpretation.enabled=false"])
    finally:
        os.chdir(cwd)
    return next(root.rglob("last.ckpt"))


def test_timms_own_transform_on_the_hub_folder_gives_predicts_probabilities(timm_photo_checkpoint, tmp_path, capsys):
    """Whoever loads the Hub folder with timm's own eval transform gets predict's answers: the store resized the
    photos with the weights' interpolation (bicubic), and the folder's crop fraction gives timm the stored size."""
    from tests.conftest import photo

    _, preprocessing = export.load_classifier(timm_photo_checkpoint)
    assert (preprocessing.resize, preprocessing.interpolation, preprocessing.stored_size) == (
        "bicubic",
        "bicubic",
        (42, 42),
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    generator = torch.Generator().manual_seed(11)
    sizes = [(300, 200), (200, 301), (97, 61), (64, 48), (150, 150), (55, 120), (401, 233), (43, 90)]
    for index, size in enumerate(sizes):
        photo(index % 3, size, generator).save(photos / f"p{index}.jpg", quality=95)
    # A threshold of "none of these" between the photos' 4th and 5th unknown scores: half of them are unknown.
    served = load_model(str(timm_photo_checkpoint), None, "cpu")
    scores = served.run(torch.stack([served.prepare(p.read_bytes()) for p in photos.iterdir()])).unknown_scores
    checkpoint = torch.load(timm_photo_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["task.unknown_threshold"] = scores.sort().values[3:5].mean()
    torch.save(checkpoint, tmp_path / "thresholded.ckpt")
    assert_timm_transform_agrees_with_predict(tmp_path / "thresholded.ckpt", photos, tmp_path, capsys, thresholded=True)


def assert_timm_transform_agrees_with_predict(
    checkpoint: Path, photos: Path, tmp_path: Path, capsys, thresholded: bool = False
) -> None:
    """predict --model on the checkpoint's Hub folder against timm's own transform and model on the same files, turned
    into answers by the model card's own lines: the same pixels (to float rounding), probabilities within 1e-3, and
    the same "none of these"."""
    import csv

    from PIL import Image

    _, preprocessing = export.load_classifier(checkpoint)
    folder = export_hub(checkpoint, tmp_path / "hub")
    output = tmp_path / "predictions.csv"
    code, err = run(["predict", "--model", str(folder), f"--data.predict_dir={photos}", f"--output={output}"], capsys)
    assert code == 0, err
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    assert config["interpolation"] == preprocessing.resize
    transform = timm.data.create_transform(**config)
    served = load_model(None, str(folder), "cpu")
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == len(list(photos.iterdir()))
    usage = (folder / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0].splitlines()
    first = next(i for i, line in enumerate(usage) if line.startswith(("logits", "probabilities")))
    answer_lines = "\n".join(usage[first:])  # after loading the model and its transform, as the card says
    has_rule = "unknown = -logits.logsumexp(-1) > unknown_threshold" in answer_lines
    assert has_rule or not thresholded  # a checkpoint without a threshold (too few validation images) has no line
    for row in rows:
        with Image.open(photos / row["path"]) as image, torch.no_grad():
            timms = transform(image.convert("RGB"))[None]
            namespace = {"model": model, "transform": transform, "image": image.convert("RGB")}
            exec(answer_lines, namespace)
        probabilities = namespace["probabilities"][0]
        ours = preprocessing(served.prepare((photos / row["path"]).read_bytes())[None])
        assert (timms - ours).abs().max() < 1e-5, row["path"]  # the same pixels, not only similar answers
        assert float(probabilities.max()) == pytest.approx(float(row["probability"]), abs=1e-3), row["path"]
        closest = model.pretrained_cfg["label_names"][int(probabilities.argmax())]
        assert row["unknown"] == str(has_rule and bool(namespace["unknown"][0])).lower()
        assert row["predicted_class"] == ("unknown" if row["unknown"] == "true" else closest)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_LITE0.is_dir(), reason="../shared's EfficientNet-Lite0 is absent")
def test_the_real_lite0s_hub_folder_in_timm_gives_predicts_probabilities(tmp_path, run_dir, capsys):
    """The real EfficientNet-Lite0 (bicubic, 224 of 256), frozen, fitted on real CIFAR-10 pictures enlarged to photos
    of mixed sizes and aspect ratios; timm's own transform on the Hub folder against predict on 24 more."""
    from PIL import Image

    from tests.conftest import SHARED_CIFAR10

    sizes = [(300, 200), (200, 301), (640, 480), (257, 256), (512, 300), (333, 500)]
    for split, count in (("train", 12), ("val", 4), ("new", 8)):
        for name in ("airplane", "cat", "ship"):
            folder = tmp_path / "photos" / split / name
            folder.mkdir(parents=True)
            files = sorted((SHARED_CIFAR10 / "test" / name).iterdir())[{"train": 0, "val": 12, "new": 16}[split] :]
            for index, file in enumerate(files[:count]):
                with Image.open(file) as image:
                    image.resize(sizes[index % len(sizes)], Image.BICUBIC).save(folder / f"{index}.jpg", quality=90)
    args = [
        f"--data.data_dir={tmp_path / 'photos'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.image_size=auto",
    ]
    args += [f"--model.backbone=local-dir:{SHARED_LITE0}", "--model.weights=DEFAULT", "--data.normalization=auto"]
    args += ["--model.freeze_backbone=true", "--trainer.max_epochs=2", "--test_after_fit=false"]
    args += ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--interpretation.enabled=false"]
    shutil.move(tmp_path / "photos" / "new", tmp_path / "new")
    TransferLightningCLI(args=["fit", *args])
    checkpoint = next(run_dir.rglob("last.ckpt"))
    new = tmp_path / "flat"
    new.mkdir()
    for file in (tmp_path / "new").rglob("*.jpg"):
        shutil.copy(file, new / f"{file.parent.name}-{file.name}")
    assert_timm_transform_agrees_with_predict(checkpoint, new, tmp_path, capsys)
