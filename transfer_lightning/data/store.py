"""The decoded store: every image of a class-folder tree decoded once into one memory-mapped file.

An image is decoded with PIL (JPEG, PNG, WebP, BMP, TIFF, GIF, AVIF, and HEIC with the [heif]
extra), turned upright by its EXIF orientation, converted to RGB from any mode (grayscale, RGBA,
palette, CMYK), and written as uint8 (3, H, W) into row ``i`` of ``images.npy``. Images of another
size than the store's are resized so that they cover it, keeping their aspect ratio, with the weights'
interpolation (antialiased, as PIL resizes), and centre-cropped (torchvision's ``Resize`` + ``CenterCrop``).
Reading maps the file read-only (``numpy.load(mmap_mode="r")``), so a batch reads only its own rows and a
store larger than memory trains with bounded memory.

A store is a folder ``<cache_dir>/<split>-<fingerprint>-<H>x<W>-<interpolation>[-c<centre>]/`` holding ``images.npy``,
``labels.npy`` (class indices, or a 0/1 row per image for multi-label; -1 for a file skipped as
undecodable), ``files.json`` (the file of each row),
``skipped.txt`` and ``info.json``. The
fingerprint hashes the tree's path and every file's name, label, size and modification time, so a
changed tree gets a new store. A store is built in a temporary folder and renamed into place: a
crash never leaves half a store. Trees that would take long are decoded by several processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageOps

from transfer_lightning.data.datasets import ImageArrays, ImageTensorDataset
from transfer_lightning.data.listing import list_images
from transfer_lightning.data.transforms import DEFAULT_CROP_PCT, Decoding, Interpolation, View, stored_size
from transfer_lightning.data.workers import run_tasks
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import check_free_space, remove_leftovers, reserve, temporary_path

#: Images per task handed to a decoding process.
CHUNK = 256
#: Skipped files named in the log (all of them are in the store's skipped.txt).
SKIPPED_SHOWN = 10
#: Errors a broken image file raises in PIL.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class StoredImages:
    """A decoded store: its arrays (memory-mapped), the rows that decoded, its folder, every row's file (or None)."""

    arrays: ImageArrays
    rows: torch.Tensor
    path: Path
    files: list[str] | None


def fingerprint(folder: Path, samples: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_image(
    path: str, size: tuple[int, int] | None = None, interpolation: Interpolation = "bilinear", centre: int | None = None
) -> np.ndarray:
    """uint8 (3, H, W) RGB array of the image at ``path``, upright; resized (``interpolation``) to cover ``size`` and
    cropped to it around its centre ``centre`` square (:func:`cover_and_crop`).

    Raises one of :data:`DECODE_ERRORS` when the file is not a decodable image.
    """
    with Image.open(path) as image:
        # Decoded whole, as torchvision's and timm's transforms do: a JPEG decoded at a reduced scale (PIL's draft)
        # differs by a few grey levels after resizing.
        image = ImageOps.exif_transpose(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
        image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = cover_and_crop(image, size, interpolation, centre)
    return np.asarray(image).transpose(2, 0, 1)


#: PIL's filters for the interpolations the weights declare (PIL's resize is antialiased with each).
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def cover_and_crop(
    image: Image.Image, size: tuple[int, int], interpolation: Interpolation = "bilinear", centre: int | None = None
) -> Image.Image:
    """Resize keeping the aspect ratio until ``size`` (H, W) is covered, then crop ``size`` out of the middle.

    For a square ``size`` the resize is torchvision's ``Resize(side, interpolation)`` of a PIL image, and the crop is
    placed so that its centre ``centre`` square (what evaluation takes, :func:`~.transforms.center_crop`) is exactly
    torchvision's ``CenterCrop(centre)`` of the resized image: the pixels of the weights' own evaluation transform.
    """
    height, width = size
    if image.width * height >= image.height * width:  # at least as wide as size: the height binds
        resized = (max(width, int(height * image.width / image.height)), height)
    else:
        resized = (width, max(height, int(width * image.height / image.width)))
    image = image.resize(resized, PIL_FILTERS[interpolation])
    left, top = _crop_start(resized[0], width, centre), _crop_start(resized[1], height, centre)
    return image.crop((left, top, left + width, top + height))


def _crop_start(resized: int, kept: int, centre: int | None) -> int:
    """Where the ``kept`` pixels start along a side: centred as torchvision centres (rounding half to even), the
    middle ``centre`` of them where given."""
    if centre is None:
        return int(round((resized - kept) / 2))
    return min(max(int(round((resized - centre) / 2)) - (kept - centre) // 2, 0), resized - kept)


def read_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as it will be decoded (EXIF-rotated), from its header."""
    with Image.open(path) as image:
        width, height = image.size
        if image.format != "PNG" and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            return width, height
    return height, width


def _read_sizes(paths: list[str]) -> list[tuple[int, int] | str]:
    sizes = []
    for path in paths:
        try:
            sizes.append(read_size(path))
        except DECODE_ERRORS as error:
            sizes.append(f"{type(error).__name__}: {error}")
    return sizes


def _decode_rows(store_file: str, decoding: Decoding, rows: list[int], paths: list[str]) -> list[tuple[int, str]]:
    """Decode ``paths`` into ``rows`` of the store; returns (row, error) of the files that failed."""
    images = np.load(store_file, mmap_mode="r+")
    failures = []
    for row, path in zip(rows, paths, strict=True):
        try:
            images[row] = decode_image(path, *decoding)
        except DECODE_ERRORS as error:
            failures.append((row, f"{type(error).__name__}: {error}"))
    images.flush()
    return failures


def shared_store_size(
    stores: list[ImageFolderStore], image_size: int | None, root: Path, crop_pct: float = DEFAULT_CROP_PCT
) -> tuple[tuple[int, int], View]:
    """The one size (H, W) that the stores of a data set's split folders use, and the view it needs.

    The images' own size when they all share one no larger than needed (CIFAR-10's 32x32; batches are
    then resized on the device, ``resize`` view); otherwise ``image_size / crop_pct`` (``crop`` view: the
    network sees the centre ``image_size`` square, or a random resized crop in training).
    """
    sizes = {store.uniform_size() for store in stores}
    shared = sizes.pop() if len(sizes) == 1 else None
    if shared is not None and (image_size is None or max(shared) <= stored_size(image_size, crop_pct)):
        return shared, "resize"
    if image_size is None:
        raise UserInputError(
            f"The images under {root} have different sizes. Set --data.image_size (e.g. 224): "
            "each image is then resized (aspect ratio kept) and centre-cropped for the network."
        )
    return (stored_size(image_size, crop_pct),) * 2, "crop"


class ImageFolderStore:
    """The images of one class-folder tree (or of one split of a label table), and its decoded stores
    under ``cache_dir``.

    Args:
        folder: A folder of class folders; with ``classes`` None, any folder of images or one image file;
            with ``samples``, the folder their paths are relative to.
        classes: The class names (folder names), in label order; None for unlabeled images at any
            depth (all get label 0).
        cache_dir: Where stores are kept.
        skip_bad_images: Skip files that do not decode (listed in the store's skipped.txt)
            instead of stopping with the path of the first.
        samples: (path, label) of every image, listed elsewhere (a label table) instead of from the
            folders; a label is a class index, or a 0/1 tuple with one entry per class (multi-label).
        name: What the store's folder name starts with; default the folder's name.
    """

    def __init__(
        self,
        folder: Path,
        classes: list[str] | None,
        cache_dir: Path,
        skip_bad_images: bool = False,
        samples: list[tuple[str, int | tuple[int, ...]]] | None = None,
        name: str | None = None,
    ) -> None:
        self.folder, self.cache_dir, self.skip_bad_images = folder, cache_dir, skip_bad_images
        if samples is None:
            samples, left_out = list_images(folder, classes)
            left_out_line = left_out.describe(folder)
            if left_out_line:
                rank_zero_info(left_out_line)
        self.samples = samples
        self.key = f"{name or folder.name}-{fingerprint(folder, self.samples)}"
        #: How progress bars and messages name these images: the folder, and the table split's name.
        self.described = f"{folder} ({name})" if name else str(folder)
        self._sizes: list[tuple[int, int] | str] | None = None
        #: Store folders checked whole, or built, by this process: checked once, not at every look.
        self._whole: set[Path] = set()

    def uniform_size(self) -> tuple[int, int] | None:
        """(H, W) when every decodable image has that one size; ``None`` for mixed sizes.

        Read from an existing store of this tree when there is one, else from every file's header.
        """
        for info_file in self.cache_dir.glob(f"{self.key}-*/info.json"):
            if self._is_whole(info_file.parent):  # a damaged store says nothing; build() replaces it
                size = json.loads(info_file.read_text())["uniform_size"]
                return tuple(size) if size else None
        sizes = {size for size in self._header_sizes() if isinstance(size, tuple)}
        return sizes.pop() if len(sizes) == 1 else None

    def build(
        self, size: tuple[int, int], interpolation: Interpolation = "bilinear", centre: int | None = None
    ) -> Path:
        """The folder of this tree's store at ``size`` (H, W), decoded by :func:`decode_image` with ``interpolation``
        and ``centre``, built first if it does not exist yet, or again if it is damaged (cut short by a copy or a
        full disk): said in one line."""
        decoding = f"{interpolation}-c{centre}" if centre else interpolation
        path = self.cache_dir / f"{self.key}-{size[0]}x{size[1]}-{decoding}"
        if path in self._whole:
            return path
        if (path / "info.json").is_file():
            damage = store_damage(path)
            if damage is None:
                self._whole.add(path)
                return path
            rank_zero_info(f"The decoded store {path} is damaged ({damage}): building it again.")
            discard = temporary_path(path)
            path.rename(discard)  # out of the way at once; another process may look for it meanwhile
            shutil.rmtree(discard, ignore_errors=True)
        remove_leftovers(self.cache_dir)
        self._build(path, (size, interpolation, centre))
        self._whole.add(path)
        return path

    def _is_whole(self, path: Path) -> bool:
        if path not in self._whole and store_damage(path) is None:
            self._whole.add(path)
        return path in self._whole

    def dataset(self, *decoding) -> ImageTensorDataset:
        """The rows that decoded (``decoding``: :meth:`build`'s arguments), as a dataset named by its store's folder."""
        stored = self.load(*decoding)  # files.json names every row's file: absolute here, links not followed
        names = [os.path.abspath(file) for file in stored.files] if stored.files is not None else None
        return ImageTensorDataset(stored.arrays, stored.rows, source=str(stored.path.resolve()), names=names)

    def load(
        self, size: tuple[int, int], interpolation: Interpolation = "bilinear", centre: int | None = None
    ) -> StoredImages:
        """The store of this tree at ``size`` (H, W), memory-mapped (built first if need be)."""
        path = self.build(size, interpolation, centre)
        labels = torch.from_numpy(np.load(path / "labels.npy"))
        skipped = (path / "skipped.txt").read_text().splitlines()
        if skipped:
            rank_zero_info(
                f"Skipped {len(skipped)} image file(s) of {self.described} that do not decode:\n  "
                + "\n  ".join(skipped[:SKIPPED_SHOWN])
                + (f"\n  ... {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else "")
                + f"\nFull list: {path / 'skipped.txt'}"
            )
        # A read-only shared map: pages are read from the file on first use and can be dropped again.
        # (A copy-on-write map counts its whole size against the memory commit limit, so the kernel
        # refuses one larger than RAM.) torch warns that the array is not writable: nothing writes
        # to it, since every batch is gathered into a new tensor.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            images = torch.from_numpy(np.load(path / "images.npy", mmap_mode="r"))
        files = json.loads((path / "files.json").read_text()) if (path / "files.json").is_file() else None
        decoded = labels.reshape(len(labels), -1)[:, 0] >= 0  # a skipped file's label (or every entry of it) is -1
        return StoredImages(ImageArrays(images, labels), torch.nonzero(decoded).flatten(), path, files)

    def _header_sizes(self) -> list[tuple[int, int] | str]:
        if self._sizes is None:
            paths = [path for path, _ in self.samples]
            self._sizes = run_tasks(_read_sizes, [(chunk,) for chunk in _chunks(paths)], f"Reading {self.described}")
        return self._sizes

    def _build(self, path: Path, decoding: Decoding) -> None:
        size, interpolation, _ = decoding
        header_sizes = self._header_sizes()
        bad = {i: error for i, error in enumerate(header_sizes) if isinstance(error, str)}
        good = [i for i in range(len(self.samples)) if i not in bad]
        self._check_bad(bad)
        sizes = {header_sizes[i] for i in good}
        path.parent.mkdir(parents=True, exist_ok=True)
        label_bytes = np.asarray(self.samples[good[0]][1], dtype=np.int64).nbytes
        needed = len(good) * (3 * size[0] * size[1] + label_bytes) + 2**20  # and the headers and lists
        what = f"The decoded store of {self.described} at {size[0]}x{size[1]}"
        check_free_space(path.parent, needed, what, "--data.cache_dir")
        temporary = temporary_path(path)
        temporary.mkdir()
        try:
            store_file = str(temporary / "images.npy")
            np.lib.format.open_memmap(store_file, mode="w+", dtype=np.uint8, shape=(len(good), 3, *size)).flush()
            reserve(Path(store_file), os.path.getsize(store_file))  # a full disk fails here, not as SIGBUS later
            rows = list(range(len(good)))
            tasks = [
                (store_file, decoding, chunk, [self.samples[i][0] for i in indices])
                for chunk, indices in zip(_chunks(rows), _chunks(good), strict=True)
            ]
            failures = run_tasks(_decode_rows, tasks, f"Decoding {self.described} at {size[0]}x{size[1]}")
            bad |= {good[row]: error for row, error in failures}
            self._check_bad(bad)
            labels = np.array([self.samples[i][1] for i in good], dtype=np.int64)
            labels[[row for row, _ in failures]] = -1
            np.save(temporary / "labels.npy", labels)
            skipped = [f"{self.samples[i][0]}: {error}" for i, error in sorted(bad.items())]
            (temporary / "skipped.txt").write_text("".join(line + "\n" for line in skipped))
            (temporary / "files.json").write_text(json.dumps([self.samples[i][0] for i in good]))
            info = {"source": str(self.folder.resolve()), "images": len(good), "size": list(size)}
            info["interpolation"] = interpolation
            info["uniform_size"] = list(sizes.pop()) if len(sizes) == 1 else None
            info |= {"images_bytes": os.path.getsize(store_file), "images_digest": edges_digest(Path(store_file))}
            (temporary / "info.json").write_text(json.dumps(info, indent=1))
            try:
                temporary.rename(path)
            except OSError:  # another process built the same store meanwhile
                if not (path / "info.json").is_file():
                    raise
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise UserInputError(
                f"The disk filled while writing {what} into {path.parent}. Free some space, or put it on another "
                "disk with --data.cache_dir; nothing of it was left behind."
            ) from None
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _check_bad(self, bad: dict[int, str]) -> None:
        if bad and not self.skip_bad_images:
            index = min(bad)
            raise UserInputError(
                f"Cannot decode image {self.samples[index][0]} ({bad[index]}). Remove or replace this file, "
                "or set --data.skip_bad_images true to skip such files."
            )
        if len(bad) == len(self.samples):
            raise UserInputError(f"None of the {len(bad)} image files of {self.described} decodes.")


def _chunks(items: list) -> list[list]:
    return [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]


#: Bytes at each end of a store's images file that its digest covers: a cheap check that it is the file written.
DIGEST_EDGE = 4096


def edges_digest(path: Path) -> str:
    """SHA-256 of the first and last :data:`DIGEST_EDGE` bytes of a file (its header and its end), not a full read."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(DIGEST_EDGE))
        file.seek(max(0, os.path.getsize(path) - DIGEST_EDGE))
        digest.update(file.read(DIGEST_EDGE))
    return digest.hexdigest()


def store_damage(path: Path) -> str | None:
    """Why the store in ``path`` cannot be used (``None`` when it is whole), checked against its ``info.json``:
    the images file's length and digest (stores of older versions: the length its header implies), and the
    number of labels."""
    try:
        info = json.loads((path / "info.json").read_text())
        images = path / "images.npy"
        length, expected = images.stat().st_size, info.get("images_bytes") or npy_length(images)
        if length != expected:
            return f"images.npy holds {length} bytes, not {expected}"
        if "images_digest" in info and edges_digest(images) != info["images_digest"]:
            return "images.npy is not the file that was written: its first or last bytes differ"
        labels = np.load(path / "labels.npy", mmap_mode="r")
        if len(labels) != info["images"]:
            return f"labels.npy holds {len(labels)} labels for {info['images']} images"
        if not (path / "skipped.txt").is_file():
            return "skipped.txt is missing"
    except (OSError, ValueError, KeyError) as error:  # json's errors are ValueErrors
        return f"{type(error).__name__}: {error}"
    return None


def npy_length(path: Path) -> int:
    """The length in bytes that a ``.npy`` file's header says the whole file has."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(file)
        return file.tell() + int(np.prod(shape)) * dtype.itemsize
