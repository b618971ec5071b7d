"""Backbones by name (torchvision's, or timm's: :mod:`.timm_backbones`), their pretrained weights, and a new head.

A backbone name and a weights string from the config are resolved here, once, into a ready
network; the rest of the package only sees the network, the name of its head layer and what its
weights expect of their input.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.error
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from transfer_lightning.data.preparation import IMAGENET_WEIGHTS
from transfer_lightning.data.transforms import WeightsPreprocessing
from transfer_lightning.errors import UserInputError
from transfer_lightning.network.depthwise import use_small_depthwise_gradients
from transfer_lightning.network.heads import HeadName, MLPHead, pool_both_ways
from transfer_lightning.network.names import parse_backbone
from transfer_lightning.network.parts import NetworkParts
from transfer_lightning.network.stage_features import add_stage_features

#: Buffers that older state_dicts may lack; torchvision's own loaders ignore them too.
_OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)

#: Builder arguments per backbone. Inception v3 and GoogLeNet return auxiliary outputs in training
#: (GoogLeNet even without weights); torchvision's reference adds their auxiliary losses only when
#: training from scratch. Transfer trains the main head alone, so the auxiliary heads are not built.
_BUILD_ARGUMENTS = {"inception_v3": {"aux_logits": False}, "googlenet": {"aux_logits": False}}


def available_backbones() -> list[str]:
    """Names of torchvision's image classification models (``resnet18``, ``mobilenet_v2``, ...)."""
    return torchvision.models.list_models(module=torchvision.models)


def create_network(
    backbone: str,
    weights: str | None,
    num_classes: int,
    image_size: int | None = None,
    gradient_checkpointing: bool = False,
    head: HeadName = "linear",
    stage_features: list[str] | None = None,
) -> tuple[nn.Module, NetworkParts]:
    """Build ``backbone`` (a name of :mod:`.names`) with ``weights`` and a new head: ``Linear(features, num_classes)``,
    or with ``head="mlp"`` average and max pooling and :class:`~.heads.MLPHead` in place of the classifier block.

    ``weights`` is a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), ``None`` for random
    initialisation, or the path of a local ``state_dict`` (with or without the classifier); for timm
    backbones ``DEFAULT``, a ``.safetensors``/``.pth`` file or ``None``. ``image_size`` resizes the
    position embeddings of timm's vision transformers; ``gradient_checkpointing`` turns on timm's.
    ``stage_features`` names modules whose pooled outputs join the head's input (:mod:`.stage_features`).

    Returns the network and its :class:`NetworkParts`.
    Raises :class:`UserInputError` for an unknown backbone, unknown weights, an unusable file, or a
    failed download.
    """
    if num_classes < 2:
        raise UserInputError(f"num_classes must be at least 2, got {num_classes}.")
    name = parse_backbone(backbone)
    if name.library == "timm":
        from transfer_lightning.network.timm_backbones import create_timm_network  # imports timm: the extra

        network, preprocessing = create_timm_network(name, weights, num_classes, image_size, head)
        if gradient_checkpointing:
            network.body.set_grad_checkpointing(True)
        parts = NetworkParts("head", "head", None, preprocessing, "timm")
    else:
        network, parts = _torchvision_network(backbone, weights, num_classes, image_size, gradient_checkpointing)
        if head == "mlp":
            network, parts = _with_mlp_head(network, parts, backbone, num_classes)
    if stage_features:
        network, parts = add_stage_features(network, parts, stage_features, head == "mlp", backbone)
    use_small_depthwise_gradients(network)
    return network, parts


def _torchvision_network(
    backbone: str, weights: str | None, num_classes: int, image_size: int | None, gradient_checkpointing: bool
) -> tuple[nn.Module, NetworkParts]:
    if image_size is not None or gradient_checkpointing:
        raise UserInputError(
            "model.backbone_image_size and model.gradient_checkpointing are for timm backbones (timm/NAME, hf-hub:, "
            f"local-dir:); {backbone} is torchvision's: leave them unset (data.image_size sets the input size)."
        )
    if weights is not None and _looks_like_path(weights):
        network = _build(backbone, None)
        head_name = find_head(network, backbone)
        _load_state_dict_file(network, backbone, head_name, Path(weights))
    else:
        network = _build(backbone, _resolve_torchvision_weights(backbone, weights))
        head_name = find_head(network, backbone)
    old_head = network.get_submodule(head_name)
    network.set_submodule(head_name, nn.Linear(old_head.in_features, num_classes))
    known_weights = torchvision.models.get_model_weights(backbone)
    default_weights = getattr(known_weights, "DEFAULT", None)
    min_size = default_weights.meta.get("min_size") if default_weights is not None else None
    if weights and _looks_like_path(weights):
        # A local file carries no metadata. The architecture's first ImageNet weights were trained the classic
        # way (for most: resize 256, crop 224), as checkpoints from elsewhere mostly were; torchvision's later
        # DEFAULT recipes differ (MobileNetV2's resizes to 232), and cost ../shared's MobileNetV2 4 points in
        # tests/data/test_image_folders.py::test_real_photos_of_two_cifar_classes_reach_90_percent.
        preprocessing = torchvision_preprocessing(next(iter(known_weights), None))
    else:
        chosen = _resolve_torchvision_weights(backbone, weights) if weights else None
        preprocessing = torchvision_preprocessing(chosen or default_weights)
    parts = NetworkParts(head_name, head_name.split(".")[0], tuple(min_size) if min_size else None, preprocessing)
    return network, parts


def _with_mlp_head(
    network: nn.Module, parts: NetworkParts, backbone: str, num_classes: int
) -> tuple[nn.Module, NetworkParts]:
    """``network`` pooling two ways, its classifier block replaced by an :class:`MLPHead` on them, which is the head.

    The block's first Linear layer takes the pooled channels (MobileNetV3's has a hidden layer before the head)."""
    block = network.get_submodule(parts.classifier_block)
    channels = next(module for module in block.modules() if isinstance(module, nn.Linear)).in_features
    pool_both_ways(network, backbone)
    network.set_submodule(parts.classifier_block, MLPHead(2 * channels, num_classes))
    return network, dataclasses.replace(parts, head=parts.classifier_block)


def torchvision_preprocessing(weights: torchvision.models.WeightsEnum | None) -> WeightsPreprocessing:
    """What torchvision's ``weights.transforms()`` does (ImageNet's statistics at 224 when there are no weights)."""
    if weights is None:
        return IMAGENET_WEIGHTS
    transforms = weights.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    interpolation = transforms.interpolation.value
    return WeightsPreprocessing(
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        input_size=crop,
        crop_pct=crop / resize,
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


def find_head(network: nn.Module, backbone: str = "this model") -> str:
    """Dotted name of the last ``nn.Linear`` of ``network``: the classifier that transfer replaces.

    This covers torchvision's ResNet (``fc``), MobileNet/EfficientNet/ConvNeXt/VGG
    (``classifier.N``), ViT (``heads.head``) and the other families whose output is a Linear layer.
    """
    linear_names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise UserInputError(
            f"{backbone} has no Linear classifier layer to replace (e.g. SqueezeNet ends in a "
            "convolution); choose another backbone, e.g. resnet18 or mobilenet_v2."
        )
    return linear_names[-1]


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pth", ".pt", ".ckpt")) or Path(weights).exists()


def _build(backbone: str, weights: torchvision.models.WeightsEnum | None) -> nn.Module:
    try:
        return torchvision.models.get_model(backbone, weights=weights, **_BUILD_ARGUMENTS.get(backbone, {}))
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        if weights is None:
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise UserInputError(
            f"Could not download the {weights} weights of {backbone} ({error}).\n"
            f"Offline? Download {weights.url} on a machine with internet and either put it at "
            f"{cache} (torchvision's cache, set by $TORCH_HOME), or pass its path as "
            "--model.weights /path/to/file.pth (in a config file too, as "
            "configs/overrides/shared_mobilenet_v2.yaml of this repository shows)."
        ) from error


def _resolve_torchvision_weights(backbone: str, weights: str | None) -> torchvision.models.WeightsEnum | None:
    if weights is None:
        return None
    enum = torchvision.models.get_model_weights(backbone)
    try:
        return enum.verify(weights)
    except (KeyError, ValueError):
        known = ", ".join(enum.__members__)
        raise UserInputError(
            f"Unknown weights {weights!r} for {backbone}: neither a file that exists nor one of {known}. "
            "Use null for random initialisation."
        ) from None


def _load_state_dict_file(network: nn.Module, backbone: str, head_name: str, path: Path) -> None:
    """Load a local state_dict into ``network``; the classifier may be absent or of any size."""
    if not path.is_file():
        raise UserInputError(
            f"Weights file {path} does not exist. "
            "Pass an existing .pth file, a torchvision weights name such as DEFAULT, or null."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load fails on foreign bytes with many exception types
        raise UserInputError(
            f"Weights file {path} is not a state_dict saved with torch.save, or it is cut short (a download or copy "
            f"that stopped): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}."
        ) from None
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
        raise UserInputError(
            f"{path} is a Lightning checkpoint, not a backbone state_dict: "
            f"resume or evaluate it with --ckpt_path {path}."
        )
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserInputError(f"Weights file {path} does not hold a state_dict (a mapping of names to tensors).")

    expected = network.state_dict()
    is_head = lambda key: key.startswith(head_name + ".")  # noqa: E731 - the head is replaced anyway
    state_dict = {k: v for k, v in state_dict.items() if not is_head(k)}
    missing = [k for k in expected if k not in state_dict and not is_head(k) and not k.endswith(_OPTIONAL_KEY_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [k for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshapen:
        problems = [
            f"{len(keys)} {what} (e.g. {keys[0]})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshapen))
            if keys
        ]
        raise UserInputError(
            f"Weights file {path} does not fit backbone {backbone}: tensors {'; '.join(problems)}. "
            "Is it for another architecture? Pick the matching --model.backbone."
        )
    network.load_state_dict(state_dict, strict=False)


@torch.no_grad()
def check_input_size(
    network: nn.Module, size: tuple[int, int], backbone: str, min_size: tuple[int, int] | None
) -> None:
    """Run one blank image of ``size`` through ``network`` in eval mode, so that a size it cannot take fails
    here, with a message that names the sizes it takes, not deep inside the first training step."""
    modes = {module: module.training for module in network.modules()}  # frozen BatchNorm stays in eval mode
    network.eval()
    try:
        network(torch.zeros(1, 3, *size, device=next(network.parameters()).device))
    except (RuntimeError, ValueError, AssertionError) as error:
        least = f"at least {min_size[0]}x{min_size[1]}" if min_size else "e.g. 224"
        raise UserInputError(
            f"{backbone} cannot take {size[0]}x{size[1]} images ({error}). "
            f"Set --data.image_size to a size it accepts: {least} (its weights were trained at 224); a timm vision "
            "transformer takes the size of --model.backbone_image_size."
        ) from None
    finally:
        for module, training in modes.items():
            module.training = training
