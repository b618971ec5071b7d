"""timm backbones: a timm model without its classifier, a new Linear head, and what its weights expect.

timm is imported here only, and only when a timm backbone is asked for (the ``timm`` extra).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_lightning.data.transforms import WeightsPreprocessing
from transfer_lightning.errors import UserInputError
from transfer_lightning.network.heads import HeadName, MLPHead
from transfer_lightning.network.names import LOCAL_PREFIX, BackboneName

#: What huggingface_hub raises when a file is neither downloadable nor in its cache (LocalEntryNotFoundError
#: is an OSError), what timm raises for a missing tag or mismatched tensors, and torch.load's damaged files.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, ValueError)


class TimmNetwork(nn.Module):
    """``body``: the timm model with ``num_classes=0``, images -> pooled pre-logits features
    (``forward_head(pre_logits=True)``); ``head``: the new ``Linear(features, num_classes)``, or an
    :class:`~transfer_lightning.network.heads.MLPHead` on the body's average and max pooling (``catavgmax``).

    Keeping timm's model whole as ``body`` leaves every timm method to it (``group_matcher``,
    ``set_grad_checkpointing``, ``pretrained_cfg``).
    """

    def __init__(self, body: nn.Module, num_classes: int, head: HeadName = "linear") -> None:
        super().__init__()
        self.body = body
        if head == "mlp":  # timm's catavgmax pooling doubles the features; not every model's head_hidden_size says so
            self.head: nn.Module = MLPHead(2 * body.num_features, num_classes)
        else:
            self.head = nn.Linear(getattr(body, "head_hidden_size", body.num_features), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def create_timm_network(
    name: BackboneName, weights: str | None, num_classes: int, image_size: int | None, head: HeadName = "linear"
) -> tuple[TimmNetwork, WeightsPreprocessing]:
    """timm's ``name.model`` with ``weights`` (``DEFAULT``: the Hub's or the folder's; a local
    ``.safetensors``/``.pth`` file; ``None``: random), its classifier replaced by ``head``; ViTs get position
    embeddings for ``image_size``. Never falls back to random weights: a failed load is one line."""
    import timm

    arguments: dict[str, Any] = {"pretrained": weights is not None, "num_classes": 0}
    if head == "mlp":
        arguments["global_pool"] = "catavgmax"
    if weights is not None and weights != "DEFAULT":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserInputError(
                f"model.weights {weights!r} for {name.model}: neither DEFAULT (the weights named by the backbone) "
                "nor an existing .safetensors or .pth file; null initialises randomly."
            )
        arguments["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    from safetensors import SafetensorError

    try:
        body = timm.create_model(name.model, **arguments)
    except (*_DOWNLOAD_ERRORS, SafetensorError) as error:
        raise UserInputError(_load_failure(name, weights, error)) from None
    except (AssertionError, TypeError):  # ViTs assert on their pooling types: catavgmax is not one
        if head != "mlp":
            raise
        raise UserInputError(_no_concat_pooling(name)) from None
    pool = getattr(body, "global_pool", None)
    if head == "mlp" and not (hasattr(pool, "feat_mult") and pool.feat_mult() == 2):
        raise UserInputError(_no_concat_pooling(name))
    preprocessing = weights_preprocessing(body)
    if image_size is not None and hasattr(body, "set_input_size"):  # ViT, EVA, Swin: a fixed grid of patches
        body.set_input_size(img_size=image_size)  # resamples the position embeddings (DINOv2: 518 -> 224)
        preprocessing = dataclasses.replace(preprocessing, input_size=image_size)
    return TimmNetwork(body, num_classes, head), preprocessing


def _no_concat_pooling(name: BackboneName) -> str:
    """Why ``mlp`` is refused for a model that pools otherwise than by timm's SelectAdaptivePool2d (ViT's tokens,
    the ConvNeXt head's own pooling): its output would not be average and max pooling concatenated."""
    return (
        f"model.head mlp pools the last feature map two ways, which {name.model} does not do in timm (its pooling "
        "is not timm's SelectAdaptivePool2d): use a convolutional timm backbone such as EfficientNet or ResNet, "
        "or keep model.head linear."
    )


def layer_decay_scales(network: nn.Module, decay: float) -> dict[int, float]:
    """Learning-rate factor of every parameter (by id) for layer-wise decay: ``decay ** (layers above it)``,
    the layers numbered by timm's ``group_matcher`` (as ``timm.optim.param_groups_layer_decay``), the new head
    one past the body's last layer (factor 1)."""
    if not isinstance(network, TimmNetwork):
        raise UserInputError(
            "model.layer_decay numbers layers by timm's group_matcher: use a timm backbone (timm/NAME)."
        )
    if not 0 < decay <= 1:
        raise UserInputError(f"model.layer_decay must be in (0, 1] (0.75 is common), got {decay}.")
    from timm.models import group_parameters

    layers = group_parameters(network.body, network.body.group_matcher(coarse=False), reverse=True)
    head = max(layers.values()) + 1
    scales = {id(p): decay ** (head - layers.get(name, head)) for name, p in network.body.named_parameters()}
    scales.update({id(p): 1.0 for p in network.head.parameters()})
    return scales


def weights_preprocessing(body: nn.Module) -> WeightsPreprocessing:
    """Mean, std, input size, crop fraction and interpolation from the model's ``pretrained_cfg``, as
    ``timm.data.resolve_model_data_config`` resolves them."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(body)
    interpolation = config.get("interpolation", "bilinear")
    return WeightsPreprocessing(
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        input_size=int(config["input_size"][-1]),
        crop_pct=float(config.get("crop_pct", 0.875)),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
    )


def _load_failure(name: BackboneName, weights: str | None, error: Exception) -> str:
    what = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}"
    if name.model.startswith(LOCAL_PREFIX) or (weights not in (None, "DEFAULT")):
        source = weights if weights not in (None, "DEFAULT") else name.model[len(LOCAL_PREFIX) :]
        return (
            f"Could not load the weights of {name.model} from {source} ({what}). Is it a timm state_dict of this "
            "architecture, whole (a copy or download that stopped leaves a short file)?"
        )
    return (
        f"Could not load the pretrained weights of {name.model} ({what}). Offline? Download them on a machine "
        f"with internet (hf download timm/{name.model.removeprefix('hf-hub:').removeprefix('timm/')}, or timm's "
        "create_model once), then either pass the file: --model.weights /path/to/model.safetensors, or run with "
        "HF_HUB_OFFLINE=1 and the Hub cache ($HF_HOME) copied here; --model.weights null trains from random weights."
    )
