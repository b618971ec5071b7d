"""Image folders as people have them: mixed sizes and formats, split layouts, bad files, unbalanced classes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from tests.conftest import (
    SGD,
    SHARED_CIFAR10,
    SHARED_MOBILENET,
    assert_test_scores_by_hand,
    make_trainer,
    needs_shared,
    write_image_folder,
    write_photo_folder,
)
from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.data import ImageFolderDataModule, ImageFolderStore, center_crop, decode_image, store, workers
from transfer_lightning.data.datasets import EpochSampler
from transfer_lightning.data.transforms import random_resized_crop
from transfer_lightning.errors import UserInputError
from transfer_lightning.model import TransferClassifier


def make_datamodule(root: Path, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    datamodule = ImageFolderDataModule(data_dir=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


# --- Decoding ----------------------------------------------------------------------------------


def test_every_mode_and_format_decodes_to_upright_rgb(tmp_path):
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:10] = 255  # top half white: shows which way is up
    image = Image.fromarray(pixels)
    files = {
        "rgb.webp": image,
        "rgb.bmp": image,
        "gray.png": image.convert("L"),
        "rgba.png": image.convert("RGBA"),
        "palette.png": image.convert("P"),
        "cmyk.jpg": image.convert("CMYK"),
    }
    for name, content in files.items():
        content.save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
        decoded = decode_image(str(tmp_path / name))
        assert decoded.shape == (3, 20, 30) and decoded.dtype == np.uint8, name
        assert decoded[:, :8].min() > 200 and decoded[:, 12:].max() < 60, name

    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the file's top is the view's right
    image.rotate(90, expand=True).save(tmp_path / "phone.jpg", exif=exif)
    upright = decode_image(str(tmp_path / "phone.jpg"))
    assert upright.shape == (3, 20, 30)
    assert upright[:, :8].min() > 200 and upright[:, 12:].max() < 60


def test_stored_centre_view_equals_torchvision_resize_and_centre_crop(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 6, "val": 2})
    datamodule = make_datamodule(root, tmp_path, image_size=56)  # stored at 64x64
    assert datamodule.view == "crop"
    reference = T.Compose([T.Resize(64), T.CenterCrop(56), T.PILToTensor()])
    paths = [path for path, _ in ImageFolderStore(root / "val", ["ants", "bees"], tmp_path).samples]
    stored = datamodule.val_set.to_arrays().images
    for path, image in zip(paths, stored, strict=True):
        if Path(path).name == "phone.jpg":
            continue  # torchvision's transforms do not apply EXIF orientation
        expected = reference(Image.open(path).convert("RGB"))
        assert torch.equal(center_crop(image, 56), expected), path


def test_random_resized_crop_of_the_whole_image_is_a_resize_and_boxes_differ_per_image():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 16, 16)
    whole = random_resized_crop(images, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    unflipped = torch.isclose(whole, images, atol=1e-5).flatten(1).all(1)
    flipped = torch.isclose(whole, images.flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((unflipped | flipped).all()) and 10 < int(flipped.sum()) < 54
    same = torch.rand(1, 3, 32, 32).expand(64, -1, -1, -1)
    crops = random_resized_crop(same, 8)
    assert crops.shape == (64, 3, 8, 8)
    assert len(torch.unique(crops.flatten(1), dim=0)) == 64


# --- The store ---------------------------------------------------------------------------------


def test_mixed_sizes_are_stored_once_memory_mapped_at_the_crop_size(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 6, "val": 2})
    datamodule = make_datamodule(root, tmp_path, image_size=28)
    assert datamodule.train_set.arrays.images.shape[1:] == (3, 32, 32)
    stores = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(stores) == 2 and all(name.endswith("-32x32-bilinear-c28") for name in stores)  # ImageNet stats: bilinear
    maps = Path("/proc/self/maps").read_text()
    assert all(str(tmp_path / "cache" / name / "images.npy") in maps for name in stores)
    images, _ = next(iter(datamodule.val_dataloader()))
    assert datamodule.batch_transform(images, train=False).shape[-2:] == (28, 28)
    assert datamodule.batch_transform(images, train=True).shape[-2:] == (28, 28)
    # A second data module maps the same stores instead of decoding again.
    again = ImageFolderDataModule(data_dir=str(root), cache_dir=str(tmp_path / "cache"), image_size=28)
    again.setup("fit")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == stores


def test_images_of_one_size_keep_it_whatever_the_input_size(image_folder, tmp_path):
    datamodule = make_datamodule(image_folder, tmp_path, image_size=224, val_size=20)
    assert datamodule.view == "resize"
    assert datamodule.train_set.arrays.images.shape[1:] == (3, 32, 32)


def test_mixed_sizes_without_an_image_size_is_a_clear_error(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 6, "val": 2})
    with pytest.raises(UserInputError, match="different sizes. Set --data.image_size"):
        make_datamodule(root, tmp_path)


def test_parallel_build_equals_the_single_process_build(tmp_path, monkeypatch):
    root = write_photo_folder(tmp_path / "photos", {"train": 6})
    single = ImageFolderStore(root / "train", ["ants", "bees"], tmp_path / "one").load((24, 24))
    monkeypatch.setattr(workers, "POOL_MIN_SECONDS", 0.0)
    monkeypatch.setattr(store, "CHUNK", 4)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parallel = ImageFolderStore(root / "train", ["ants", "bees"], tmp_path / "two").load((24, 24))
    assert torch.equal(single.arrays.images, parallel.arrays.images)
    assert torch.equal(single.arrays.labels, parallel.arrays.labels)


def test_a_quick_tree_is_decoded_without_starting_worker_processes(tmp_path, monkeypatch):
    """Workers start in seconds (each imports torch); small images decode faster than that in this process."""
    root = write_photo_folder(tmp_path / "photos", {"train": 6})
    monkeypatch.setattr(store, "CHUNK", 4)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(workers, "ProcessPoolExecutor", None)  # calling it would fail
    tree = ImageFolderStore(root / "train", ["ants", "bees"], tmp_path / "one")
    assert len(tree.load((24, 24)).arrays.images) == len(tree.samples) > 2 * store.CHUNK
    monkeypatch.setattr(workers, "POOL_MIN_SECONDS", 0.0)
    with pytest.raises(TypeError, match="not callable"):
        ImageFolderStore(root / "train", ["ants", "bees"], tmp_path / "two").load((24, 24))


# --- Split layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("splits", "val_size", "sizes", "test_is_val"),
    [
        ({"train": 6, "val": 3}, 5000, (18, 12, 12), True),
        ({"train": 6, "valid": 3}, 5000, (18, 12, 12), True),
        ({"train": 6, "val": 3, "test": 2}, 5000, (18, 12, 10), False),
        ({"train": 6, "test": 2}, 4, (14, 4, 10), False),
        ({"": 6}, 0.25, (14, 4, 4), True),
    ],
    ids=["train+val", "train+valid", "train+val+test", "train+test", "class-folders-only"],
)
def test_split_layouts(tmp_path, caplog, splits, val_size, sizes, test_is_val):
    root = write_photo_folder(tmp_path / "photos", splits)
    with caplog.at_level(logging.INFO):
        datamodule = make_datamodule(root, tmp_path, image_size=32, val_size=val_size)
    assert (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set)) == sizes
    assert (datamodule.test_set is datamodule.val_set) == test_is_val
    assert datamodule.class_names == ["ants", "bees"]
    layout = next(line for line in caplog.text.splitlines() if "Data (2 classes): train = " in line)
    assert f"({sizes[0]} images)" in layout and f"({sizes[2]} images)" in layout
    if test_is_val:
        assert "no test folder" in layout
    assert "Training images per class: " in caplog.text


def test_split_folders_with_other_classes_are_a_clear_error(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 2, "val": 1})
    shutil.rmtree(root / "val" / "bees")
    with pytest.raises(UserInputError, match="different class folders .*bees"):
        ImageFolderDataModule(data_dir=str(root))


# --- Bad images --------------------------------------------------------------------------------


def write_bad_files(folder: Path) -> list[str]:
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image, just text with a .jpg name\n")
    whole = (folder / "000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return ["empty.jpg", "notes.jpg", "truncated.jpg"]


def test_a_bad_image_stops_the_run_with_its_path_by_default(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 3, "val": 1})
    (root / "train" / "ants" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserInputError, match="Cannot decode image .*empty.jpg.*skip_bad_images true"):
        make_datamodule(root, tmp_path, image_size=32)
    assert not list((tmp_path / "cache").glob("**/*"))  # nothing half-written


def test_a_truncated_jpeg_stops_the_run_too(tmp_path):
    root = write_photo_folder(tmp_path / "photos", {"train": 3, "val": 1})
    whole = (root / "train" / "ants" / "000.jpg").read_bytes()
    (root / "train" / "ants" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserInputError, match="Cannot decode image .*truncated.jpg"):
        make_datamodule(root, tmp_path, image_size=32)
    assert not list((tmp_path / "cache").glob("**/*"))


def test_skip_bad_images_skips_logs_and_lists_them(tmp_path, caplog):
    root = write_photo_folder(tmp_path / "photos", {"train": 4, "val": 1})
    bad = write_bad_files(root / "train" / "ants")
    with caplog.at_level(logging.INFO):
        datamodule = make_datamodule(root, tmp_path, image_size=32, skip_bad_images=True)
    assert len(datamodule.train_set) == 2 * (4 + 3)  # the bad files are not served
    assert "Skipped 3 image file(s)" in caplog.text
    listed = next((tmp_path / "cache").glob("train-*/skipped.txt")).read_text().splitlines()
    assert sorted(Path(line.split(":")[0]).name for line in listed) == bad
    images, labels = datamodule.train_set.to_arrays()
    assert bool((images.flatten(1).amax(1) > 0).all())  # no blank row of a skipped file
    names = datamodule.train_set.image_names() + datamodule.val_set.image_names()
    assert len(set(names)) == len(names) == 2 * (4 + 3) + 2 * (1 + 3)  # each image by its own file (audit's name)
    assert not {Path(name).name for name in names if "/ants/" in name} & set(bad)


# --- Unbalanced classes ------------------------------------------------------------------------


def unbalanced_folder(root: Path) -> Path:
    write_image_folder(root, train_per_class=3, test_per_class=2)
    generator_source = root / "train" / "cat" / "00000.png"
    for i in range(3, 45):
        shutil.copy(generator_source, root / "train" / "cat" / f"{i:05d}.png")
    return root  # train: 45 cat, 3 each of dog, frog, ship


def test_class_balance_sampler_draws_classes_evenly(tmp_path, caplog):
    root = unbalanced_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        datamodule = make_datamodule(root, tmp_path, val_size=0, class_balance="sampler")
    assert "Training images per class: 45 cat, 3 dog, 3 frog, 3 ship" in caplog.text
    sampler = datamodule.train_dataloader().sampler
    assert isinstance(sampler, EpochSampler)
    drawn = []
    for epoch in range(50):
        sampler.set_epoch(epoch)
        drawn.append(datamodule.train_set.labels[list(sampler)])
    drawn = torch.cat(drawn)
    shares = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.03)
    plain = make_datamodule(root, tmp_path, val_size=0)
    drawn = plain.train_set.labels[list(plain.train_dataloader().sampler)]
    assert torch.bincount(drawn, minlength=4).tolist() == [45, 3, 3, 3]


def test_class_balance_loss_weighs_the_training_loss(tmp_path, monkeypatch):
    root = unbalanced_folder(tmp_path / "data")
    datamodule = make_datamodule(root, tmp_path, val_size=0, class_balance="loss")
    expected = torch.tensor([54 / 180, 54 / 12, 54 / 12, 54 / 12])
    torch.testing.assert_close(datamodule.loss_weights, expected)
    weights_used = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recording_cross_entropy(logits, labels, weight=None, **kwargs):
        weights_used.append(weight)
        return cross_entropy(logits, labels, weight=weight, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording_cross_entropy)
    model = TransferClassifier(weights=None, num_classes=4, optimizer=SGD)
    datamodule.use_weights(model.weights_preprocessing)
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(model, datamodule)
    assert len(weights_used) == 1  # the one training step, weighted
    torch.testing.assert_close(weights_used[0], expected)
    assert make_datamodule(root, tmp_path, val_size=0).loss_weights is None


# --- End to end --------------------------------------------------------------------------------


def test_a_tutorial_shaped_folder_trains_through_the_cli_at_224(tmp_path, run_dir):
    root = write_photo_folder(tmp_path / "hymenoptera", {"train": 6, "val": 3})
    cli = TransferLightningCLI(
        args=[
            "fit",
            f"--data.data_dir={root}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.image_size=224",
            "--data.augment=true",
            "--data.batch_size=8",
            "--model.backbone=mobilenet_v2",
            "--model.weights=null",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.model.hparams.num_classes == 2
    assert cli.model.class_names == ["ants", "bees"]
    assert len(cli.datamodule.test_set) == 2 * (3 + 3)
    # The best checkpoint was tested on the centre crops, not on augmented views.
    assert_test_scores_by_hand(cli)


@pytest.mark.slow
@needs_shared
def test_real_photos_of_two_cifar_classes_reach_90_percent(tmp_path, run_dir):
    """Two CIFAR-10 classes re-encoded as JPEGs of random sizes (100-500 px); the real MobileNetV2 separates them."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 300), ("val", 100)):
        for name in ("airplane", "frog"):
            folder = tmp_path / "photos" / split / name
            folder.mkdir(parents=True)
            source = "train" if split == "train" else "test"
            for path in sorted((SHARED_CIFAR10 / source / name).glob("*.png"))[:count]:
                side, aspect = rng.integers(100, 501), rng.uniform(3 / 4, 4 / 3)  # photo-like shapes
                size = (int(side), int(np.clip(side * aspect, 100, 500)))
                image = Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
                image.save(folder / f"{path.stem}.jpg", quality=90)
    cli = TransferLightningCLI(
        args=[
            "fit",
            f"--data.data_dir={tmp_path / 'photos'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.image_size=224",
            "--data.augment=true",
            "--data.crop_scale=[0.35, 1.0]",  # torchvision's 0.08 is too harsh for 3 short epochs
            "--data.batch_size=32",
            "--model.backbone=mobilenet_v2",
            f"--model.weights={SHARED_MOBILENET}",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.lr=0.01",
            "--model.optimizer.momentum=0.9",
            "--trainer.max_epochs=3",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.checkpoint_callback.best_model_score >= 0.90
