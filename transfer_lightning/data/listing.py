"""Which files of a folder tree are images to read, as a file browser shows the tree.

Hidden files and folders (``.DS_Store``, macOS's ``._photo.jpg`` AppleDouble files, ``.git/``) and
the system files that copying from a Mac or Windows leaves (``__MACOSX/``, ``Thumbs.db``,
``desktop.ini``) are skipped and counted; so are files of other types, by extension, so that the
log says what was left out instead of a data set shrinking silently. Images are listed in the
order of torchvision's ``make_dataset`` (class by class, sorted), which the store's key depends on.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import features
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from transfer_lightning.errors import UserInputError

#: Names that operating systems and archivers leave in folders; never data.
SYSTEM_NAMES = {"__macosx", "thumbs.db", "desktop.ini", "$recycle.bin", "system volume information"}
#: Extensions of photo formats that need a plugin: pillow-heif, the [heif] extra.
HEIF_EXTENSIONS = (".heic", ".heif")


def _readable_extensions() -> tuple[str, ...]:
    """torchvision's ``IMG_EXTENSIONS``, GIF (its first frame) and AVIF, which Pillow reads itself,
    and HEIC/HEIF when pillow-heif is installed (its opener is registered here, in every process
    that imports this module, decoding processes included)."""
    extensions = [*IMG_EXTENSIONS, ".gif"]
    if features.check("avif"):
        extensions.append(".avif")
    if importlib.util.find_spec("pillow_heif") is not None:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        extensions += HEIF_EXTENSIONS
    return tuple(extensions)


#: Extensions (lower case) of the image files that are read.
IMAGE_EXTENSIONS = _readable_extensions()


def is_hidden_or_system(name: str) -> bool:
    """Whether a file browser hides ``name`` or it is an operating system's file (skipped, never data)."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


@dataclass
class LeftOut:
    """Files of a tree that were not read: hidden or system files, and files of other types by extension."""

    hidden_or_system: int = 0
    by_extension: Counter = field(default_factory=Counter)

    def describe(self, folder: Path) -> str | None:
        """One log line, or ``None`` when nothing was left out."""
        parts = []
        if self.hidden_or_system:
            parts.append(f"{self.hidden_or_system} hidden or system files (._*, .DS_Store, __MACOSX/, Thumbs.db, ...)")
        if self.by_extension:
            kinds = ", ".join(f"{count} {ext or '(no extension)'}" for ext, count in self.by_extension.most_common())
            parts.append(f"{sum(self.by_extension.values())} files that are not images it reads ({kinds})")
        if not parts:
            return None
        line = f"Left out under {folder}: {' and '.join(parts)}."
        if any(ext in HEIF_EXTENSIONS for ext in self.by_extension):
            line += (
                " HEIC/HEIF photos are read with the [heif] extra (pip install -e '.[heif]'), or convert them to JPEG."
            )
        return line


def find_classes(folder: Path) -> list[str]:
    """The class names under ``folder``: its sub-folders, sorted, hidden and system folders skipped."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not is_hidden_or_system(entry.name))


def list_images(folder: Path, classes: list[str] | None) -> tuple[list[tuple[str, int]], LeftOut]:
    """(path, class index) of every image file under ``folder/<class>/`` (torchvision's order), and what
    was left out. With ``classes`` None: (path, 0) of every image file under ``folder`` at any depth, or
    of ``folder`` itself when it is a file (unlabeled images to predict on)."""
    left_out = LeftOut()

    def is_image(path: str) -> bool:
        if any(is_hidden_or_system(part) for part in Path(os.path.relpath(path, folder)).parts):
            left_out.hidden_or_system += 1
            return False
        extension = os.path.splitext(path)[1].lower()
        if extension not in IMAGE_EXTENSIONS:
            left_out.by_extension[extension] += 1
            return False
        return True

    if classes is None:
        if folder.is_file():
            return [(str(folder), 0)], left_out
        paths = sorted(
            os.path.join(parent, name) for parent, _, names in os.walk(folder, followlinks=True) for name in names
        )
        samples = [(path, 0) for path in paths if is_image(path)]
        if not samples:
            raise UserInputError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
        return samples, left_out
    class_to_index = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(folder, class_to_index, is_valid_file=is_image, allow_empty=True)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise UserInputError(
            f"No image in the class folder(s) {', '.join(empty)} under {folder}. Every class folder under {folder} "
            f"needs at least one image ({', '.join(IMAGE_EXTENSIONS)}): add images, or remove the folder."
        )
    return samples, left_out
