"""Tiny data sets made by the tests, the runs several test modules share, and the helpers they share."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_CIFAR10 = SHARED / "data" / "cifar10"
SHARED_MOBILENET = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
needs_shared = pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared (real CIFAR-10 and weights) is absent")

CLASSES = ["cat", "dog", "frog", "ship"]
#: The reference recipe's config, which the small runs shrink.
FINETUNE_SGD = Path(__file__).resolve().parents[1] / "configs" / "finetune_sgd.yaml"


def class_images(label: int, count: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """uint8 images whose colour depends on the class, so a tiny model can learn them."""
    base = torch.zeros(3, 1, 1)
    base[label % 3] = 160 + 30 * (label // 3)
    noise = torch.randint(0, 60, (count, 3, size, size), generator=generator)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def write_image_folder(root: Path, train_per_class: int = 30, test_per_class: int = 8) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(class_images(label, count, generator)):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return root


def write_cifar10_batches(root: Path, per_batch: int = 20, test_size: int = 40) -> Path:
    """A tiny copy of torchvision's ``cifar-10-batches-py`` format (10 classes, random pixels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_size if name == "test_batch" else per_batch
        labels = [i % 10 for i in range(count)]
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "labels": labels}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("image_folder"))


@pytest.fixture(scope="session")
def cifar_batches(tmp_path_factory) -> Path:
    return write_cifar10_batches(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder so that logs and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def small_run_args(image_folder, tmp_path) -> list[str]:
    """CLI overrides that shrink any config to seconds on the tiny image folder, offline."""
    return [
        f"--data.data_dir={image_folder}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.val_size=20",
        "--data.batch_size=16",
        "--model.weights=null",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


#: (width, height) of the photos in :func:`write_photo_folder`: several sizes and aspect ratios.
PHOTO_SIZES = [(64, 48), (48, 64), (80, 80), (120, 45), (50, 90), (97, 61)]


def photo(label: int, size: tuple[int, int], generator: torch.Generator) -> Image.Image:
    """An RGB PIL image of ``size`` (width, height) whose colour depends on the class."""
    width, height = size
    image = class_images(label, 1, generator, size=max(size))[0, :, :height, :width]
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def write_photo_folder(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("ants", "bees")) -> Path:
    """``root/<split>/<class>/`` of JPEGs in mixed sizes, like the PyTorch tutorial's ants/bees data.

    ``splits`` maps a split folder name (``""`` for class folders directly under root) to images per
    class. Each class folder also holds a grayscale JPEG, an RGBA PNG and an EXIF-rotated JPEG.
    """
    generator = torch.Generator().manual_seed(1)
    for split, count in splits.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                photo(label, PHOTO_SIZES[i % len(PHOTO_SIZES)], generator).save(folder / f"{i:03d}.jpg", quality=92)
            photo(label, (70, 50), generator).convert("L").save(folder / "gray.jpg")
            photo(label, (60, 40), generator).convert("RGBA").save(folder / "alpha.png")
            exif = Image.Exif()
            exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
            photo(label, (72, 40), generator).save(folder / "phone.jpg", exif=exif)
    return root


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path_factory, monkeypatch):
    """Decoded stores and features of commands run without --data.cache_dir go to a temporary folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))


def prepared_by_hand(datamodule, images: torch.Tensor, **settings) -> torch.Tensor:
    """``images`` as the network's input by ``prepare_batch`` with the data's resolved mean and std, outside the
    data module's own batch transform (``settings``: image_size, view, ...)."""
    from transfer_lightning.data import prepare_batch

    mean, std = (torch.tensor(values) for values in (datamodule.preparation.mean, datamodule.preparation.std))
    return prepare_batch(images, mean, std, augment=False, **settings)


def assert_test_scores_by_hand(cli, batches: int | None = None, autocast: bool = False) -> None:
    """The test accuracy and loss a CLI run logged equal those recomputed outside Lightning's loop: the
    network's own outputs on the test images prepared by ``prepare_batch`` (no feature cache, no
    test_step, no torchmetrics), over the first ``batches`` batches (all by default) as the test loader
    serves them; with the model's ``tta_flip``, the mean probabilities of each image and its mirror
    image. The loss is what catches an input that a barely trained network scores the same way."""
    import torch.nn.functional as F

    model, datamodule = cli.model.eval(), cli.datamodule
    prep = datamodule.preparation  # the settings with auto resolved; the scoring below is this test's own
    settings = {"image_size": prep.image_size, "view": datamodule.view, "interpolation": prep.interpolation}
    correct, losses, total = 0, [], 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for index, (images, labels) in enumerate(datamodule.test_set.batches(datamodule.hparams.batch_size)):
            if batches is not None and index == batches:
                break
            inputs = prepared_by_hand(datamodule, images, **settings)
            probabilities = model.network(inputs).float().softmax(dim=1)
            if model.hparams.tta_flip:
                probabilities = (probabilities + model.network(inputs.flip(-1)).float().softmax(dim=1)) / 2
            correct += int((probabilities.argmax(dim=1) == labels).sum())
            losses.append(F.nll_loss(probabilities.log(), labels, reduction="none"))
            total += len(labels)
    losses = torch.cat(losses)
    assert float(losses.std()) > 1e-3, (
        "the network's outputs hardly depend on its input: this check would prove nothing"
    )
    logged = cli.trainer.callback_metrics
    assert float(logged["test/acc"]) == pytest.approx(correct / total, abs=1e-6)
    tolerance = 2e-2 if autocast else 1e-4
    assert float(logged["test/loss"]) == pytest.approx(float(losses.mean()), rel=tolerance, abs=tolerance)


#: The tags of :func:`write_tagged_images`: each is a bright quadrant of the image.
TAGS = ["sand", "sea", "sky", "sun"]


def tagged_image(present: list[int], generator: torch.Generator, size: int = 32) -> Image.Image:
    """Noise in which each present tag's quadrant (top-left, top-right, bottom-left, bottom-right) is bright."""
    image = torch.randint(0, 60, (3, size, size), generator=generator)
    half = size // 2
    for tag, on in enumerate(present):
        if on:
            top, left = (tag // 2) * half, (tag % 2) * half
            image[:, top : top + half, left : left + half] += 150
    return Image.fromarray(image.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def write_tagged_images(folder: Path, count: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``count`` PNGs under ``folder`` with one to three of :data:`TAGS` each; returns (file name, tags)."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        present = (torch.rand(len(TAGS), generator=generator) < 0.4).int().tolist()
        if not any(present):
            present[index % len(TAGS)] = 1
        name = f"img{index:04d}.png"
        tagged_image(present, generator).save(folder / name)
        written.append((name, [tag for tag, on in zip(TAGS, present, strict=True) if on]))
    return written


def eval_pixels(path, preprocessing) -> torch.Tensor:
    """uint8 (3, H, W) of an image file as the weights' own evaluation transform makes it, computed with torchvision
    alone (an independent reference for our decoding): upright, RGB, ``Resize(stored side)`` with the preprocessing's
    resize filter, ``CenterCrop`` to the size an exported model takes."""
    from PIL import ImageOps
    from torchvision.transforms import v2

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    mode = v2.InterpolationMode.BICUBIC if preprocessing.resize == "bicubic" else v2.InterpolationMode.BILINEAR
    height, width = preprocessing.caller_size
    if (image.height, image.width) != tuple(preprocessing.stored_size):
        image = v2.Resize(min(preprocessing.stored_size), interpolation=mode)(image)
    return torch.from_numpy(np.asarray(v2.CenterCrop((height, width))(image)).transpose(2, 0, 1).copy())


#: The classes of the photo runs that the inference and serving tests use.
PHOTO_CLASSES = ("ants", "bees", "wasps")
#: Command-line flags that keep a test run quiet and on the CPU.
QUIET = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit_in(folder: Path, args: list[str]) -> None:
    """``fit`` with ``args``, run from ``folder`` (its lightning_logs/ goes there), as a user in that folder would."""
    from transfer_lightning.commands.main import main

    cwd = Path.cwd()
    os.chdir(folder)
    try:
        main(["fit", *args])
    finally:
        os.chdir(cwd)


def fit_photo_run(
    root: Path, splits: dict[str, int], classes: tuple[str, ...], optimizer: str, lr: float, epochs: int
) -> Path:
    """Fit a small random-weight model on mixed-size photos at 32 px in ``root`` (no test), copy its last checkpoint
    to ``root/last.ckpt``, and return the photos' folder."""
    photos = write_photo_folder(root / "photos", splits, classes=classes)
    args = [f"--data.data_dir={photos}", f"--data.cache_dir={root / 'cache'}", "--data.image_size=32"]
    args += [
        "--data.batch_size=16",
        "--model.weights=null",
        f"--model.optimizer={optimizer}",
        f"--model.optimizer.lr={lr}",
    ]
    fit_in(root, [*args, f"--trainer.max_epochs={epochs}", "--test_after_fit=false", *QUIET])
    shutil.copy(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", root / "last.ckpt")
    return photos


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A folder holding ``last.ckpt`` of a small model fitted on mixed-size photos at 32 px, and its cache."""
    root = tmp_path_factory.mktemp("trained")
    photos = fit_photo_run(root, {"train": 12, "val": 4}, PHOTO_CLASSES, "SGD", 0.05, epochs=3)
    shutil.rmtree(photos)  # predict and export need only the checkpoint
    return root


# --- Helpers shared by several test modules ------------------------------------------------------------------

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def datamodule_for(image_folder, tmp_path, **kwargs):
    """The CIFAR-like image folder as a data module: 20 validation images, batches of 16, ImageNet's statistics
    (named, so a plain Trainer needs no ``use_weights`` handshake: the models here have random weights)."""
    from transfer_lightning.data import ImageFolderDataModule

    settings = {"val_size": 20, "batch_size": 16, "normalization": "imagenet"} | kwargs
    return ImageFolderDataModule(data_dir=str(image_folder), cache_dir=str(tmp_path / "cache"), **settings)


def make_trainer(tmp_path, **kwargs):
    """A plain Trainer on the CPU for a few batches, without logger, checkpoints or progress bars."""
    # Imported here, not at the top: lightning.pytorch imported before pytest's log capture is set up gives itself
    # a handler and stops propagating, and caplog then sees none of its lines (pytest 7 and 8).
    import lightning.pytorch as pl

    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**settings, **kwargs})


def head_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.head.state_dict().items()}


def write_tagged_table(root: Path, train: int = 96, val: int = 32, test: int = 32) -> Path:
    """``root/images/*.png`` and ``root/tags.csv`` (file, tags separated by spaces, split)."""
    written = write_tagged_images(root / "images", train + val + test)
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    rows = [f"{name},{' '.join(tags)},{split}" for (name, tags), split in zip(written, splits, strict=True)]
    (root / "tags.csv").write_text("image,tags,split\n" + "\n".join(rows) + "\n")
    return root / "tags.csv"


def table_args(table: Path, cache: Path) -> list[str]:
    """A small multi-label run over the tagged table: random weights, SGD, batches of 16."""
    return [
        f"--data.labels_file={table}",
        f"--data.images_dir={table.parent / 'images'}",
        f"--data.cache_dir={cache}",
        "--data.batch_size=16",
        "--model.weights=null",
        "--model.optimizer=SGD",
        "--model.optimizer.lr=0.05",
        *QUIET,
    ]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> Path:
    """A folder holding a label table, its images, and the run of a multi-label model fitted (and tested) on it."""
    root = tmp_path_factory.mktemp("tagged")
    table = write_tagged_table(root)
    fit_in(root, [*table_args(table, root / "cache"), "--trainer.max_epochs=6"])
    return root


def best_checkpoint(root: Path) -> Path:
    (path,) = (root / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt")
    return path


#: Two processes under DDP on the CPU.
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]


def run_cli(*args: str, cwd: Path) -> None:
    """The real entry point in a fresh process: Lightning's DDP launcher starts the second one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "transfer_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


def small_ddp_args(image_folder: Path, cache: Path) -> list[str]:
    """One short epoch on the image folder; 21 validation and 32 test images: 2 processes cannot split 21 evenly,
    so padding would show."""
    return [
        f"--data.data_dir={image_folder}",
        f"--data.cache_dir={cache}",
        "--data.val_size=21",
        "--data.batch_size=8",
        "--model.weights=null",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def stops(args: list[str], capsys, run_dir: Path) -> str:
    """Run the CLI, expecting exit 2 with one line on stderr and nothing written; returns that line."""
    from transfer_lightning.commands.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # not progress bars
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (run_dir / "lightning_logs").exists() and not (run_dir / "data").exists()
    return lines[0]
