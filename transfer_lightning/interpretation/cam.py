"""Grad-CAM class activation maps: where in an image the evidence for a class lies.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional feature map by the mean
gradient of the class score over it, and keeps the positive part of the weighted sum. It is written
here with one forward hook: jacobgil's ``grad-cam`` package pulls in OpenCV and scikit-learn, and
Captum is a library of attribution methods of which this needs one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfer_lightning.errors import UserInputError


def find_cam_layer(network: nn.Module, sample: Tensor) -> str:
    """Dotted name of the last module of ``network`` (in the order modules finish on ``sample``) whose
    output is a (N, C, H, W) map larger than 1x1, not counting adaptive pooling: the last convolutional
    block before pooling.

    That is ``layer4`` of a ResNet, ``features`` of MobileNet, EfficientNet, ConvNeXt, VGG and DenseNet,
    ``trunk_output`` of RegNet and ``permute`` of Swin (its channels-first last stage). Vision
    Transformers keep no such map after their patch embedding: they are refused.
    """
    finished: list[tuple[str, torch.Size | None]] = []  # (name, output shape) in the order modules finish

    def record(name: str):
        return lambda _module, _args, output: finished.append((name, output.shape if torch.is_tensor(output) else None))

    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # VGG and AlexNet pool to 7x7 before their classifier
    hooks = [
        module.register_forward_hook(record(name))
        for name, module in network.named_modules()
        if name and not isinstance(module, pools)
    ]
    try:
        with torch.no_grad():
            network(sample[:1])
    finally:
        for hook in hooks:
            hook.remove()
    maps = [
        i for i, (_, shape) in enumerate(finished) if shape is not None and len(shape) == 4 and shape[-2:].numel() > 1
    ]
    if not maps:
        raise UserInputError("This network has no (N, C, H, W) feature map to explain: turn the activation maps off.")
    last = maps[-1]
    if any(shape is not None and len(shape) == 3 for _, shape in finished[last + 1 :]):
        raise UserInputError(
            f"This network turns its feature map into tokens after {finished[last][0]!r} (a vision transformer): "
            "Grad-CAM needs a convolutional map before pooling. Turn the activation maps off, or name a layer."
        )
    return finished[last][0]


def grad_cam(model: nn.Module, layer: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] of ``classes`` (N,) for the prepared ``images`` (N, 3, H, W).

    ``layer`` is a module of ``model`` with a (N, C, h, w) output (:func:`find_cam_layer`). Its output is
    made a leaf that requires grad, so the maps exist on a frozen backbone too and no gradient flows to
    the parameters. Runs in eval mode, with gradients on (also inside Lightning's inference mode) and
    eagerly where the model is compiled; each map is scaled to its own maximum (all zero without evidence).
    """
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _args: object, output: Tensor) -> Tensor:
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    was_training = model.training
    hook = layer.register_forward_hook(keep)
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.compiler.set_stance("force_eager"):
            # Tensors made in inference mode cannot enter autograd; their clones can.
            inputs, index = images.clone(), classes.view(-1, 1).to(images.device).clone()
            scores = model(inputs).gather(1, index)
            (gradients,) = torch.autograd.grad(scores.sum(), captured[-1])
    finally:
        hook.remove()
        model.train(was_training)
    activations = captured[-1].detach()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    maps = F.relu((weights * activations).sum(dim=1, keepdim=True)).float()
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peaks = maps.amax(dim=(1, 2), keepdim=True)
    return torch.where(peaks > 0, maps / peaks.clamp(min=1e-12), torch.zeros_like(maps))


def resolve_cam_layer(network: nn.Module, name: str | None, sample: Tensor | None = None) -> nn.Module:
    """The module ``name`` of ``network`` (a dotted name, as ``model.trainable_from`` takes), or the one
    :func:`find_cam_layer` finds on ``sample`` when ``name`` is null."""
    name = name or find_cam_layer(network, sample)
    try:
        return network.get_submodule(name)
    except AttributeError:
        top = ", ".join(child for child, _ in network.named_children())
        raise UserInputError(
            f"cam_layer {name!r} is not a module of this network; its top-level modules are {top} "
            "(dotted names reach inside: layer4.1, features.18)."
        ) from None
