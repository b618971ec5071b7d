"""Duplicates and outliers from cosine similarities, a block of rows at a time: the N x N matrix is never held
(60,000 images: a 250-row block of similarities is 60 MB, the whole matrix 14 GB).

Two images are near duplicates when either of two signals says so clearly, or both say so a little, since each
misses what the other finds (docs/guides/audit.md measures them on planted copies in CIFAR-10):

- their **frozen features** are nearly the same: the cosine similarity of the centred unit features (their mean over
  the images taken away: pooled features after a ReLU are all positive, which puts any two images at a high cosine;
  centred, 0 is "unrelated" whatever the backbone). It finds the same shot resized or cropped a little;
- their **pixels** are nearly the same: the cosine similarity of 16x16 thumbnails (area averages of the stored
  image, each colour channel less its mean, so that two images of one colour are not alike for it). It finds a
  copy saved again at another JPEG quality, which moves a small image's features a long way;
- both are **fairly alike** at once: the same shot zoomed or cropped by a tenth, which takes each signal below
  its own threshold, but rarely two different photos.

Exact duplicates are images whose decoded pixels are identical (a hash of each), whatever their files. An outlier
is an image far from its nearest neighbours (Sun et al., 2022, "Out-of-distribution Detection with Deep Nearest
Neighbors": L2-normalised features, not centred, which would hide how unusual an image's features are): its score
is one minus the mean cosine similarity to its ``k`` nearest other images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from transfer_lightning.logs import progress_bar

#: Rows of the similarity matrix computed at a time (60,000 images: 60 MB a block).
BLOCK = 250
#: Side of the thumbnails whose pixels are compared.
THUMBNAIL = 16


def normalise_(vectors: Tensor) -> Tensor:
    """``vectors`` (float) with each row scaled to length 1, in place (a copy of 60,000 features is 300 MB)."""
    return vectors.div_(vectors.norm(dim=1, keepdim=True).clamp(min=1e-12))


def centre_(vectors: Tensor) -> Tensor:
    """``vectors`` less their mean over the rows, each row then at length 1 again, in place."""
    return normalise_(vectors.sub_(vectors.mean(dim=0)))


def similarity_blocks(rows: Tensor, what: str, upper: bool = False) -> Iterator[tuple[int, Tensor]]:
    """(first row, cosine similarities of unit ``rows[first : first + BLOCK]`` with every row), with a progress bar;
    ``upper``: only with the rows from ``first`` on (each pair once, for half the work)."""
    starts = range(0, len(rows), BLOCK)
    for start in progress_bar(starts, total=len(starts), desc=what, unit="block"):
        yield start, rows[start : start + BLOCK] @ (rows[start:] if upper else rows).T


class NearThresholds(NamedTuple):
    """Two images are near duplicates when their features' similarity is at least ``features``, their thumbnails'
    at least ``pixels``, or both at least ``both``."""

    features: float
    pixels: float
    both: float


def near_pairs(features: Tensor, thumbnails: Tensor, thresholds: NearThresholds) -> set[tuple[int, int]]:
    """(i, j), i < j, of the images whose unit ``features`` or unit ``thumbnails`` are alike by ``thresholds``."""
    pairs = set()
    for start, by_features in similarity_blocks(features, "Near duplicates", upper=True):
        by_pixels = thumbnails[start : start + BLOCK] @ thumbnails[start:].T
        alike = (by_features >= thresholds.features) | (by_pixels >= thresholds.pixels)
        alike |= (by_features >= thresholds.both) & (by_pixels >= thresholds.both)
        i, j = torch.nonzero(alike.triu(diagonal=1), as_tuple=True)  # column c is row start + c: later rows only
        pairs.update(zip((i + start).tolist(), (j + start).tolist(), strict=True))
    return pairs


def pixel_signatures(batches: Iterable[Tensor]) -> tuple[list[bytes], Tensor]:
    """The SHA-256 of each image's decoded pixels, and its unit 16x16 thumbnail (each channel less its mean), from
    uint8 batches."""
    digests, thumbnails = [], []
    for batch in batches:
        digests += [hashlib.sha256(image.contiguous().numpy().tobytes()).digest() for image in batch]
        small = F.adaptive_avg_pool2d(batch.float(), (THUMBNAIL, THUMBNAIL))
        thumbnails.append(F.normalize((small - small.mean(dim=(2, 3), keepdim=True)).flatten(1), dim=1))
    return digests, torch.cat(thumbnails)


def exact_duplicates(digests: list[bytes]) -> list[tuple[int, int]]:
    """(i, j), i < j, of images with identical pixels: each paired with the first one of its content."""
    first_of: dict[bytes, int] = {}
    pairs = []
    for index, digest in enumerate(digests):
        if digest in first_of:
            pairs.append((first_of[digest], index))
        else:
            first_of[digest] = index
    return pairs


def outlier_scores(rows: Tensor, k: int) -> Tensor:
    """(N,) one minus the mean cosine similarity of each of the unit ``rows`` to its ``k`` nearest other rows."""
    scores = torch.empty(len(rows))
    for start, block in similarity_blocks(rows, "Outliers"):
        rows = torch.arange(len(block))
        block[rows, rows + start] = -2.0  # not its own neighbour
        scores[start : start + len(block)] = 1 - block.topk(min(k, len(rows) - 1), dim=1).values.mean(dim=1)
    return scores


def far_out(scores: Tensor) -> Tensor:
    """(N,) bool: the scores beyond Tukey's far-out fence, the third quartile plus three interquartile ranges."""
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75]))
    return scores > q3 + 3 * (q3 - q1)
