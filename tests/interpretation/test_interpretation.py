"""Where the model looks and fails: Grad-CAM (cam.py), top losses, confused pairs, the training batch, and
predict's explanations (interpretation.py, PredictionsCSV)."""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchvision.utils import make_grid

from tests.conftest import QUIET, prepared_by_hand
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.commands.main import main
from transfer_lightning.errors import UserInputError
from transfer_lightning.interpretation import most_confused, top_losses
from transfer_lightning.interpretation.cam import find_cam_layer, grad_cam, resolve_cam_layer
from transfer_lightning.model import TransferClassifier

PATCH = 8  # side of the bright patch, in a 32 x 32 image


def patch_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is where a bright patch is: 0 top-left corner, 1 bottom-right corner,
    2 no patch (so that "no patch in the other corner" is no evidence for a class)."""
    images = torch.rand(count, 3, 32, 32, generator=generator) * 0.5
    labels = torch.randint(0, 3, (count,), generator=generator)
    images[labels == 0, :, :PATCH, :PATCH] = 1.0
    images[labels == 1, :, -PATCH:, -PATCH:] = 1.0
    return images, labels


def test_activation_maps_point_at_the_evidence():
    """A small CNN trained to tell where a bright patch is: the Grad-CAM map of each patch image's class
    has its maximum inside the patch, for at least 90% of the images."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_images, train_labels = patch_images(768, generator)
    test_images, test_labels = patch_images(150, generator)
    network = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    epochs, batch = 15, 64
    optimizer = torch.optim.AdamW(network.parameters(), 3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=epochs * (768 // batch))
    for _ in range(epochs):
        order = torch.randperm(768)
        for start in range(0, 768, batch):
            chosen = order[start : start + batch]
            loss = F.cross_entropy(network(train_images[chosen]), train_labels[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    network.eval()
    with torch.no_grad():
        accuracy = (network(test_images).argmax(dim=1) == test_labels).float().mean()
    assert accuracy > 0.95

    layer = network.get_submodule(find_cam_layer(network, test_images))
    assert layer is network[5]  # the last ReLU: the map before pooling

    def share_inside(images: torch.Tensor, classes: torch.Tensor, corners: torch.Tensor) -> float:
        """How many of the maps of ``classes`` peak inside the patch at ``corners`` (0 top-left, 1 bottom-right)."""
        maps = grad_cam(network, layer, images, classes)
        rows, cols = np.unravel_index(maps.flatten(1).argmax(dim=1).numpy(), (32, 32))
        top_left = (rows < PATCH) & (cols < PATCH)
        bottom_right = (rows >= 32 - PATCH) & (cols >= 32 - PATCH)
        return float(np.where(corners.numpy() == 0, top_left, bottom_right).mean())

    patched = test_labels < 2
    assert share_inside(test_images[patched], test_labels[patched], test_labels[patched]) >= 0.9
    # Class-discriminative: on images with both patches each class's map peaks in its own corner. (A
    # random network's maps peak at the bright patch too, so the one-patch images alone would not show it.)
    both = torch.rand(60, 3, 32, 32, generator=generator) * 0.5
    both[:, :, :PATCH, :PATCH] = 1.0
    both[:, :, -PATCH:, -PATCH:] = 1.0
    for corner in (0, 1):
        classes = torch.full((60,), corner)
        assert share_inside(both, classes, classes) >= 0.9


def test_grad_cam_of_a_frozen_resnet_is_its_class_activation_map():
    """On a network that pools globally before its Linear head, Grad-CAM equals the class activation map of
    Zhou et al. (2016): the head's weights of the class times the last feature map. Computed here from
    the feature map alone; the backbone is frozen, and no gradient reaches a parameter."""
    torch.manual_seed(0)
    model = TransferClassifier(backbone="resnet18", weights=None, num_classes=3, freeze_backbone=True)
    images, classes = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    layer = resolve_cam_layer(model.network, None, images)
    assert layer is model.network.layer4
    maps = grad_cam(model, layer, images, classes)

    captured = []
    hook = layer.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model.eval()(images)
    hook.remove()
    expected = F.relu(torch.einsum("nchw,nc->nhw", captured[0], model.head.weight[classes]))
    expected = F.interpolate(expected[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    expected = expected / expected.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is False


@pytest.mark.parametrize(
    ("backbone", "layer"),
    [("resnet18", "layer4"), ("mobilenet_v2", "features"), ("vgg11", "features"), ("swin_t", "permute")],
)
def test_cam_layer_of_torchvision_backbones(backbone, layer):
    """The last convolutional block before pooling, for several families (Swin's channels-first last stage)."""
    model = TransferClassifier(backbone=backbone, weights=None, num_classes=2)
    assert find_cam_layer(model.network, torch.zeros(1, 3, 224, 224)) == layer


def test_cam_layer_errors():
    """A vision transformer has no map to explain; a name that is no module lists the ones there are."""
    vit = TransferClassifier(backbone="vit_b_16", weights=None, num_classes=2)
    with pytest.raises(UserInputError, match="vision transformer"):
        find_cam_layer(vit.network, torch.zeros(1, 3, 224, 224))
    resnet = TransferClassifier(backbone="resnet18", weights=None, num_classes=2)
    assert resolve_cam_layer(resnet.network, "layer3", torch.zeros(1, 3, 64, 64)) is resnet.network.layer3
    with pytest.raises(UserInputError, match="layer9.*conv1, bn1"):
        resolve_cam_layer(resnet.network, "layer9", torch.zeros(1, 3, 64, 64))


def test_top_losses_and_confused_pairs_by_hand():
    losses = torch.tensor([0.5, 2.0, 0.1, 2.0, 3.0, 0.7])
    assert top_losses(losses, 3).tolist() == [4, 1, 3]  # equal losses: the earlier image first
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([1, 1, 0, 0, 1, 1])
    pairs = most_confused(labels, predicted, losses, pairs=5, per_pair=1)
    assert [(p.true, p.predicted, p.count, p.examples) for p in pairs] == [
        (0, 1, 2, [1]),
        (1, 0, 1, [3]),
        (2, 1, 1, [5]),
    ]


def png(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def interpreted(image_folder, tmp_path_factory):
    """A fit (and its test) on the tiny image folder, with the first training batch the network received."""
    root = tmp_path_factory.mktemp("interpreted")
    first_batches = []
    training_step = TransferClassifier.training_step

    def spy(self, batch, batch_idx):
        first_batches.append(batch[0].detach().clone())
        return training_step(self, batch, batch_idx)

    # Two training batches: a model that still confuses classes, so that every picture is drawn.
    args = [f"--data.data_dir={image_folder}", f"--data.cache_dir={root / 'cache'}", "--data.val_size=20",
            "--data.batch_size=16", "--model.weights=null", "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2", "--seed_everything=0", "--interpretation.top_k=6", *QUIET]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(TransferClassifier, "training_step", spy)
        cli = TransferLightningCLI(args=["fit", *args])
        main(["test", f"--ckpt_path={cli.trainer.checkpoint_callback.best_model_path}", *args])
    return root, cli, first_batches[0]


def test_fit_writes_the_pictures(interpreted):
    """After fit (and its test): the first training batch, exactly as the network got it, de-normalised;
    the top losses, equal to sorting the test images' losses computed by hand; their maps and the most
    confused pairs; as PNGs in the run folder and images in TensorBoard."""
    root, cli, first_batch = interpreted
    version = root / "lightning_logs" / "version_0"
    for name in ("train_batch.png", "top_losses.png", "top_losses_cam.png", "most_confused.png", "top_losses.csv"):
        assert (version / name).is_file(), name

    datamodule = cli.datamodule
    mean, std = (
        torch.tensor(datamodule.preparation.mean).view(1, 3, 1, 1),
        torch.tensor(datamodule.preparation.std).view(1, 3, 1, 1),
    )
    pixels = (first_batch[:32] * std + mean).clamp(0, 1)
    expected = make_grid(pixels, nrow=8, padding=2).mul(255).round().to(torch.uint8)
    assert torch.equal(png((version / "train_batch.png").read_bytes()), expected)
    events = EventAccumulator(str(version), size_guidance={"images": 0}).Reload()
    assert torch.equal(png(events.Images("train/batch")[0].encoded_image_string), expected)
    assert {"test/top_losses", "test/top_losses_cam", "test/most_confused"} <= set(events.Tags()["images"])

    images, labels = datamodule.test_set.to_arrays()
    inputs = prepared_by_hand(datamodule, images, image_size=None, view="resize")
    with torch.no_grad():
        losses = F.cross_entropy(cli.model.eval().network(inputs), labels, reduction="none")
    with open(version / "top_losses.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    written = torch.tensor([float(r["loss"]) for r in rows])
    assert torch.allclose(written, losses.sort(descending=True).values[:6], atol=1e-4)
    assert torch.allclose(written, losses[[int(r["index"]) for r in rows]], atol=1e-4)
    names = datamodule.class_names
    assert [r["true"] for r in rows] == [names[labels[int(r["index"])]] for r in rows]


def test_html_report_is_self_contained(interpreted):
    """report --html: one file that loads nothing from anywhere, every picture embedded as a PNG; the
    comparison table of both runs, then each run's settings, report and pictures."""
    root, _, _ = interpreted
    page_path = root / "report.html"
    main(["report", str(root / "lightning_logs"), "--html", str(page_path)])
    page = page_path.read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    for src in sources:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert page.count("<img ") == page.count('<img src="data:image/png;base64,')
    # Comparison curves; fit run: curves, confusion matrix, reliability diagram, top losses, maps, confused pairs,
    # training batch; test run: the confusion matrix, reliability diagram, top losses, maps and confused pairs.
    assert len(sources) == 1 + 7 + 5
    assert page.count("<h3>Reliability: accuracy against confidence") == 2
    assert "<h2>Comparison</h2>" in page and "<h2>version_0</h2>" in page and "<h2>version_1</h2>" in page
    report = (root / "lightning_logs" / "version_0" / "classification_report.md").read_text()
    assert "<th>precision</th>" in page and re.search(r"accuracy [\d.]+%", report).group(0) in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_chromium(interpreted, tmp_path):
    """Headless Chromium, with the network off, draws the page: a screenshot with the pictures in it."""
    root, _, _ = interpreted
    page = root / "report.html"
    main(["report", str(root / "lightning_logs"), "--html", str(page)])
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,3000",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = np.array(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1200)
    saturated = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60  # colour: the curves and pictures
    assert saturated.mean() > 0.02


def test_interpretation_off(run_dir, small_run_args):
    main(["fit", *small_run_args, "--trainer.max_epochs=1", "--interpretation.enabled=false"])
    version = run_dir / "lightning_logs" / "version_0"
    assert (version / "classification_report.md").is_file()
    assert not list(version.glob("*.png")) and not (version / "top_losses.csv").exists()


def test_predict_explain_writes_one_picture_per_image(trained, tmp_path, monkeypatch):  # noqa: F811
    """predict --predictions.explain true: next to predictions.csv, each image beside its map, named by its
    path, and a contact sheet."""
    folder = tmp_path / "new"
    generator = torch.Generator().manual_seed(3)
    for index, size in enumerate([(40, 30), (32, 32), (50, 70)]):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / ("sub" if index else "") / f"img{index}.{'png' if index else 'jpg'}")
    monkeypatch.chdir(tmp_path)
    main(["predict", f"--ckpt_path={trained / 'last.ckpt'}", f"--data.predict_dir={folder}",
          "--predictions.explain=true", f"--data.cache_dir={tmp_path / 'cache'}", *QUIET])  # fmt: skip
    version = tmp_path / "lightning_logs" / "version_0"
    pictures = sorted(
        p.relative_to(version / "explanations").as_posix() for p in (version / "explanations").rglob("*.png")
    )
    assert pictures == ["img0.jpg.png", "sub/img1.png", "sub/img2.png"]
    picture = Image.open(version / "explanations" / "sub" / "img1.png")
    assert picture.size == (64, 32)  # the 32 x 32 network input beside its map
    assert (version / "explanations.png").is_file()
    with open(version / "predictions.csv") as file:
        assert len(list(csv.DictReader(file))) == 3


def test_wrong_cam_layer_is_one_clear_error_before_testing(interpreted, capsys):
    root, cli, _ = interpreted
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.chdir(root)
        data = [
            f"--data.data_dir={cli.datamodule.hparams.data_dir}",
            f"--data.cache_dir={root / 'cache'}",
            "--data.val_size=20",
        ]
        main(["test", f"--ckpt_path={checkpoint}", *data, "--interpretation.cam_layer=layer9", *QUIET])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "cam_layer 'layer9' is not a module" in error and "Traceback" not in error
    assert not (root / "lightning_logs" / "version_2" / "classification_report.md").exists()
