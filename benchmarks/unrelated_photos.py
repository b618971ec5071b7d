"""Real photos of things that are none of CIFAR-10's classes, for ``benchmarks/unknowns.py``: the sample photos that
scikit-image's wheel carries (public-domain or freely licensed, see its ``skimage/data/README.txt``), read from the
wheel without installing it::

    pip download scikit-image --no-deps -d /tmp/wheels
    python benchmarks/unrelated_photos.py --wheel /tmp/wheels/scikit_image-*.whl --output /tmp/unrelated

Writes ``photos/`` (18 photos: an astronaut, a cameraman, coffee, coins, the Moon, the Hubble deep field, a retina,
a rocket, a motorcycle, bricks, grass, gravel, microscopy, a clock, a page of text, ...), ``faces/`` (100 faces of
Labeled Faces in the Wild, 25x25 grey) and ``backgrounds/`` (100 background patches of the same photos). Left out:
``chelsea.png`` (a cat: a CIFAR-10 class), ``horse.png`` (a silhouette of a CIFAR-10 class), drawings (chessboards,
colour charts, logos, the phantom) and the right image of the motorcycle's stereo pair (the left one's twin).
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

#: Sample photos of scikit-image's wheel that are real photos of none of CIFAR-10's classes.
PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "clock_motion.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
]  # fmt: skip
#: Faces (the first 100) and background patches (the next 100) of Labeled Faces in the Wild, 25x25 in [0, 1].
LFW = "lfw_subset.npy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", required=True, help="scikit-image's wheel (pip download scikit-image --no-deps)")
    parser.add_argument("--output", required=True, help="the folder to write photos/, faces/ and backgrounds/ into")
    args = parser.parse_args()
    output = Path(args.output)
    with zipfile.ZipFile(args.wheel) as wheel:
        (output / "photos").mkdir(parents=True, exist_ok=True)
        for name in PHOTOS:
            (output / "photos" / name).write_bytes(wheel.read(f"skimage/data/{name}"))
        lfw = np.load(io.BytesIO(wheel.read(f"skimage/data/{LFW}")))
    for folder, images in (("faces", lfw[:100]), ("backgrounds", lfw[100:])):
        (output / folder).mkdir(exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray((image * 255).round().astype(np.uint8)).save(output / folder / f"{index:03d}.png")
    print(f"{len(PHOTOS)} photos, 100 faces and 100 backgrounds in {output}")


if __name__ == "__main__":
    main()
