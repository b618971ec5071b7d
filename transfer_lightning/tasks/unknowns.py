""" "None of these": an out-of-distribution score per image, and the threshold above which an image is of no known
class.

The score is the energy of the logits, ``-logsumexp(logits)`` (Liu et al., 2020, "Energy-based Out-of-distribution
Detection"): low where the network's evidence for some class is strong, high where it has none for any. Unlike the
largest softmax probability it keeps the logits' scale, which the softmax divides away, and it needs nothing but
the logits, so exported files compute it too. docs/guides/unknowns.md measures it against the largest softmax
probability and the distance to the nearest training features (``benchmarks/unknowns.py``).

The threshold is chosen on validation, whose images are all of known classes: the score below which a set share
of them (``model.known_rate``) falls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: What a rejected image's predicted class reads, in predict's CSV and serve's answers.
UNKNOWN = "unknown"


def energy_scores(logits: Tensor) -> Tensor:
    """(N,) ``-logsumexp(logits)``: the higher, the less like any known class. The raw logits' (temperature 1, as
    Liu et al.), so that calibration does not move it."""
    return -torch.logsumexp(logits.float(), dim=-1)


def known_threshold(scores: Tensor, known_rate: float) -> float:
    """The lowest of the (known) images' ``scores`` at or below which at least ``known_rate`` of them fall; infinite
    (rejecting nothing) for no scores."""
    if len(scores) == 0:
        return math.inf
    kept = math.ceil(round(known_rate * len(scores), 6))  # 0.95 * 600 is 570.0000000000001 in floats
    return float(scores.kthvalue(max(kept, 1)).values)


def rejected(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """(N,) bool: the images whose score is above ``threshold`` (none when it is infinite: no rule was chosen)."""
    return scores > threshold
