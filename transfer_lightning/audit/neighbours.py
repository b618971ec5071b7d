"""Duplicates and outliers from the features' cosine similarities, a block of rows at a time: the N x N matrix is
never held (60,000 images: a 1,000-row block of similarities is 240 MB, the whole matrix 14 GB).

Near duplicates are pairs above a cosine similarity threshold of the centred features (their mean over the images
taken away: pooled features after a ReLU are all positive, which puts any two images at a high cosine; centred, 0
is "unrelated" whatever the backbone, so one threshold serves all). Exact duplicates are images whose decoded
pixels are identical (a hash of each), whatever their files. An outlier is an image far from its nearest
neighbours (Sun et al., 2022, "Out-of-distribution Detection with Deep Nearest Neighbors": L2-normalised features,
not centred, which would hide how unusual an image's features are): its score is one minus the mean cosine
similarity to its ``k`` nearest other images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from transfer_lightning.logs import progress_bar

#: Rows of the similarity matrix computed at a time.
BLOCK = 1000


def similarity_blocks(features: Tensor, what: str, centre: bool) -> Iterator[tuple[int, Tensor]]:
    """(first row, cosine similarities of rows ``first..first+BLOCK`` with every row), with a progress bar; with
    ``centre``, of the features less their mean over the images."""
    features = features.float()
    normalised = F.normalize(features - features.mean(dim=0) if centre else features, dim=1)
    starts = range(0, len(normalised), BLOCK)
    for start in progress_bar(starts, total=len(starts), desc=what, unit="block"):
        yield start, normalised[start : start + BLOCK] @ normalised.T


def near_duplicates(features: Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, similarity) of every pair i < j whose cosine similarity is at least ``threshold``, most similar first."""
    pairs = []
    for start, block in similarity_blocks(features, "Near duplicates", centre=True):
        rows = torch.arange(start, start + len(block))[:, None]
        block = block.masked_fill(torch.arange(len(features))[None, :] <= rows, -2.0)  # each pair once, no self
        i, j = torch.nonzero(block >= threshold, as_tuple=True)
        pairs += zip((i + start).tolist(), j.tolist(), block[i, j].tolist(), strict=True)
    return sorted(pairs, key=lambda pair: -pair[2])


def exact_duplicates(pixel_batches: Iterator[Tensor]) -> list[tuple[int, int]]:
    """(i, j), i < j, of the images whose decoded pixels are identical, from uint8 batches in order: each image
    paired with the first one of its content."""
    first_of: dict[bytes, int] = {}
    pairs, index = [], 0
    for batch in pixel_batches:
        for image in batch:
            digest = hashlib.sha256(image.contiguous().numpy().tobytes()).digest()
            if digest in first_of:
                pairs.append((first_of[digest], index))
            else:
                first_of[digest] = index
            index += 1
    return pairs


def outlier_scores(features: Tensor, k: int) -> Tensor:
    """(N,) one minus the mean cosine similarity of each image to its ``k`` nearest other images."""
    scores = torch.empty(len(features))
    for start, block in similarity_blocks(features, "Outliers", centre=False):
        rows = torch.arange(len(block))
        block[rows, rows + start] = -2.0  # not its own neighbour
        scores[start : start + len(block)] = 1 - block.topk(min(k, len(features) - 1), dim=1).values.mean(dim=1)
    return scores


def far_out(scores: Tensor) -> Tensor:
    """(N,) bool: the scores beyond Tukey's far-out fence, the third quartile plus three interquartile ranges."""
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75]))
    return scores > q3 + 3 * (q3 - q1)
