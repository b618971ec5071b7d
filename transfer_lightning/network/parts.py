"""Where the parts of a built network are (:class:`NetworkParts`): its own module, since both the backbones and the
stage features that rewire them name the parts."""

from __future__ import annotations

from dataclasses import dataclass

from transfer_lightning.data.transforms import WeightsPreprocessing


@dataclass(frozen=True)
class NetworkParts:
    """Where the parts of a built network are, and what its weights say about their inputs.

    Attributes:
        head: Dotted name of the new head: a ``Linear`` (``"fc"``, ``"classifier.1"``, ``"heads.head"``), or the
            whole classifier block for ``mlp`` (``"fc"``, ``"classifier"``).
        classifier_block: The module that holds the head (``"fc"``, ``"classifier"``; with stage features
            ``"classifier.block"``): what the frozen-feature cache trains on the backbone's pooled features.
        min_size: Smallest (H, W) input, from the torchvision weights' metadata (``None`` if unknown).
        preprocessing: What the weights expect: their mean, std, size, crop fraction and interpolation.
        library: Who built the network: ``torchvision`` or ``timm``.
    """

    head: str
    classifier_block: str
    min_size: tuple[int, int] | None
    preprocessing: WeightsPreprocessing
    library: str = "torchvision"
