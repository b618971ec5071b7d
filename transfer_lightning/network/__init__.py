"""The network: torchvision backbones by name with a new head (:mod:`.backbones`), which parts are frozen
and how they run (:mod:`.freezing`), and the backbone in onnxruntime (:mod:`.onnx`)."""

from transfer_lightning.network.backbones import (
    available_backbones,
    check_input_size,
    create_network,
    find_head,
)
from transfer_lightning.network.freezing import FrozenBatchNorm, FrozenParts, GradualUnfreezing
from transfer_lightning.network.parts import NetworkParts

__all__ = [
    "FrozenBatchNorm",
    "FrozenParts",
    "GradualUnfreezing",
    "NetworkParts",
    "available_backbones",
    "check_input_size",
    "create_network",
    "find_head",
]
