"""Data sources, splits, the decode cache and the batch transforms."""

from __future__ import annotations

import shutil

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from tests.conftest import CLASSES, SHARED_CIFAR10, needs_shared, write_image_folder
from transfer_lightning.data import (
    CIFAR10_CLASSES,
    CIFAR10DataModule,
    ImageFolderDataModule,
    ImageFolderStore,
    prepare_batch,
    random_crop,
    random_flip,
    store,
    stratified_split,
)
from transfer_lightning.data.datasets import EpochSampler
from transfer_lightning.errors import UserInputError


def make_datamodule(data_dir, tmp_path, **kwargs) -> CIFAR10DataModule:
    datamodule = CIFAR10DataModule(data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_image_folder_splits_sizes_and_no_overlap(image_folder, tmp_path):
    datamodule = make_datamodule(image_folder, tmp_path, val_size=20)
    assert datamodule.class_names == CLASSES
    assert len(datamodule.train_set) == 4 * 30 - 20
    assert len(datamodule.val_set) == 20
    assert len(datamodule.test_set) == 4 * 8
    # Every training image appears exactly once across train and val.
    pool = torch.cat([datamodule.train_set.to_arrays().images, datamodule.val_set.to_arrays().images]).flatten(1)
    assert len(torch.unique(pool, dim=0)) == 4 * 30
    # Stratified: 20 of 120 images over 4 equal classes is 5 per class.
    assert torch.bincount(datamodule.val_set.labels).tolist() == [5, 5, 5, 5]


def test_split_is_repeatable_for_a_seed_and_changes_with_it():
    labels = torch.arange(1000) % 10
    train, val = stratified_split(labels, 137, seed=3)
    again_train, again_val = stratified_split(labels, 137, seed=3)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, stratified_split(labels, 137, seed=4)[1])
    assert len(val) == 137 and len(train) == 863
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(torch.bincount(labels[val]).tolist(), reverse=True) == [14] * 7 + [13] * 3


@pytest.mark.parametrize("val_size", [120, 500])
def test_val_size_larger_than_training_set_is_a_clear_error(image_folder, tmp_path, val_size):
    with pytest.raises(
        UserInputError, match=rf"val_size {val_size} holds out .* has 120: set --data.val_size to a fraction"
    ):
        make_datamodule(image_folder, tmp_path, val_size=val_size)


def test_val_size_zero_validates_on_the_test_set(image_folder, tmp_path):
    datamodule = make_datamodule(image_folder, tmp_path, val_size=0)
    assert datamodule.val_set is datamodule.test_set
    assert len(datamodule.train_set) == 4 * 30


def test_cifar10_batches_format(cifar_batches, tmp_path):
    datamodule = make_datamodule(cifar_batches, tmp_path, val_size=10)
    assert datamodule.class_names == CIFAR10_CLASSES
    assert len(datamodule.train_set) == 90 and len(datamodule.test_set) == 40
    images, labels = datamodule.train_set.to_arrays()
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)


def read_store(folder, cache, size=(32, 32)):
    return ImageFolderStore(folder, CLASSES, cache).load(size)


def test_decoded_images_equal_the_files_and_are_stored(image_folder, tmp_path):
    stored = read_store(image_folder / "train", tmp_path)
    first = image_folder / "train" / "cat" / "00000.png"
    assert torch.equal(stored.arrays.images[0], T.functional.pil_to_tensor(Image.open(first).convert("RGB")))
    assert [path.name for path in tmp_path.glob("train-*")] == [stored.path.name]
    assert stored.path.name.endswith("-32x32-bilinear")
    assert not list(tmp_path.glob(".*tmp"))


def test_store_is_rebuilt_for_a_changed_source(tmp_path):
    root = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1)
    cache = tmp_path / "cache"
    before = read_store(root / "train", cache)
    shutil.copy(root / "train" / "dog" / "00000.png", root / "train" / "cat" / "00099.png")
    after = read_store(root / "train", cache)
    assert len(after.arrays.labels) == len(before.arrays.labels) + 1
    assert len(list(cache.glob("train-*"))) == 2


def test_corrupt_image_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1)
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="Cannot decode image .*broken.png.*skip_bad_images"):
        make_datamodule(root, tmp_path)
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written


def test_empty_class_folder_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1)
    (root / "train" / "zebra").mkdir()
    (root / "test" / "zebra").mkdir()
    with pytest.raises(UserInputError, match="zebra"):
        make_datamodule(root, tmp_path, val_size=2)


def test_train_and_test_with_different_classes_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1)
    shutil.rmtree(root / "test" / "ship")
    with pytest.raises(UserInputError, match="different class folders .*ship"):
        CIFAR10DataModule(data_dir=str(root))


def test_missing_data_is_a_clear_error(tmp_path):
    # The CLI's one line for it is tested with the other bad input (test_bad_input.py); here, what it says.
    with pytest.raises(UserInputError, match=r"data_dir .*nothing does not exist.*train/<class>.*cifar-10-batches-py"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nothing"), download=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(UserInputError, match="No data in .*cifar-10-batches-py.*train/<class>"):
        CIFAR10DataModule(data_dir=str(tmp_path / "notes"))


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"val_size": -1}, {"image_size": 0}, {"num_workers": -2}])
def test_out_of_range_arguments_are_clear_errors(image_folder, bad):
    with pytest.raises(UserInputError, match=next(iter(bad))):
        CIFAR10DataModule(data_dir=str(image_folder), **bad)


def test_loader_batches_are_uint8_slices(image_folder, tmp_path):
    datamodule = make_datamodule(image_folder, tmp_path, val_size=20, batch_size=16)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (16,)
    assert len(datamodule.train_dataloader()) == 7  # 100 images, batch 16, last batch kept


def test_reference_normalisation_equals_torchvision_transforms():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    reference = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    expected = torch.stack([reference(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
    half = torch.full((3,), 0.5)
    assert torch.allclose(prepare_batch(images, half, half, augment=False, image_size=None), expected, atol=1e-6)


def test_resize_changes_the_batch_size_on_the_device():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    batch = prepare_batch(images, torch.zeros(3), torch.ones(3), augment=False, image_size=64)
    assert batch.shape == (2, 3, 64, 64)


def test_random_crop_and_flip_are_per_sample():
    torch.manual_seed(0)
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8)
    batch = image.repeat(64, 1, 1, 1)
    cropped = random_crop(batch, padding=2)
    assert cropped.shape == batch.shape
    assert len(torch.unique(cropped.flatten(1), dim=0)) > 10  # different offsets per image
    # Every crop is a shifted window of the zero-padded image.
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = {tuple(padded[0, :, y : y + 8, x : x + 8].flatten().tolist()) for y in range(5) for x in range(5)}
    assert all(tuple(crop.flatten().tolist()) in windows for crop in cropped)
    flipped = random_flip(batch)
    is_flipped = torch.tensor([torch.equal(f, image[0].flip(-1)) for f in flipped])
    is_same = torch.tensor([torch.equal(f, image[0]) for f in flipped])
    assert bool((is_flipped | is_same).all()) and 10 < int(is_flipped.sum()) < 54


@pytest.mark.slow
@needs_shared
def test_real_cifar10_folder_matches_its_readme(tmp_path):
    datamodule = make_datamodule(SHARED_CIFAR10, tmp_path, val_size=5000)
    assert datamodule.class_names == CIFAR10_CLASSES
    assert len(datamodule.train_set) == 45000 and len(datamodule.test_set) == 10000
    assert torch.bincount(datamodule.val_set.labels).tolist() == [500] * 10
    mean = datamodule.train_set.to_arrays().images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=3e-3)


def test_a_crash_while_writing_the_store_leaves_no_file(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", train_per_class=3, test_per_class=1)
    cache = tmp_path / "cache"

    def crash(path, *decoding):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "decode_image", crash)
    with pytest.raises(KeyboardInterrupt):
        read_store(root / "train", cache)
    assert not list(cache.iterdir())
    monkeypatch.undo()
    assert len(read_store(root / "train", cache).rows) == 12


@pytest.mark.parametrize(("size", "world_size"), [(10, 2), (11, 3), (7, 4)])
def test_ddp_training_shards_are_disjoint_and_cover_the_training_set(size, world_size):
    """What each DDP process trains on in one epoch: the processes' shares are disjoint apart from the
    padding that evens them out (as DistributedSampler pads), and together they cover every image."""
    shares = [list(EpochSampler(size, seed=3, rank=rank, world_size=world_size)) for rank in range(world_size)]
    assert all(len(share) == -(-size // world_size) for share in shares)
    every = [index for share in shares for index in share]
    assert set(every) == set(range(size))
    assert len(every) - len(set(every)) == world_size * -(-size // world_size) - size  # only the padding repeats
    single = list(EpochSampler(size, seed=3))
    interleaved = [shares[i % world_size][i // world_size] for i in range(size)]
    assert interleaved == single  # rank r takes every world_size-th image of the one epoch order


def test_class_names_that_contradict_the_folders_are_one_clear_error(image_folder):
    with pytest.raises(UserInputError, match=r"differ from the class folders of .*'ship'\]\. Leave data.class_names"):
        ImageFolderDataModule(data_dir=str(image_folder), class_names=["a", "b", "c", "d"])
    given = ImageFolderDataModule(data_dir=str(image_folder), class_names=["cat", "dog", "frog", "ship"])
    assert given.class_names == ["cat", "dog", "frog", "ship"]
