"""The weight gradient of depthwise convolutions on inputs of at most 2x2 pixels, as sums of products.

oneDNN's depthwise weight-gradient kernel is slow on such inputs (MobileNetV2's last blocks at 32 px), above all
without AVX-512; one multiply-and-sum pass per kernel tap is faster there (docs/performance.md, "AVX2 CPUs";
``benchmarks/depthwise_gradient.py``). From 3x3 inputs on oneDNN is the faster, so it keeps those, and every forward
pass and input gradient. Only on CPUs, and only where a gradient is taken.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

#: Inputs up to this many pixels high and wide get the weight gradient of :func:`depthwise_weight_gradient`.
MAX_INPUT_SIDE = 2


def depthwise_weight_gradient(
    grad_output: Tensor, images: Tensor, kernel: tuple[int, int], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:  # fmt: skip
    """d loss / d weight of ``conv2d(images, weight, groups=channels)`` (one filter per channel): for each kernel
    tap, the sum over images and positions of the output gradient times the input pixel that tap sees."""
    padded = F.pad(images, (padding[1], padding[1], padding[0], padding[0]))
    rows, columns = grad_output.shape[-2:]
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dilation[0], j * dilation[1]
            bottom, right = top + stride[0] * (rows - 1) + 1, left + stride[1] * (columns - 1) + 1
            seen = padded[:, :, top : bottom : stride[0], left : right : stride[1]]
            taps.append((grad_output * seen).sum(dim=(0, 2, 3)))
    return torch.stack(taps, dim=1).view(-1, 1, *kernel)


class SmallDepthwiseConv(torch.autograd.Function):
    """``conv2d`` of a depthwise layer: oneDNN's forward pass and input gradient, our weight gradient."""

    @staticmethod
    def forward(ctx, images: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
        ctx.save_for_backward(images, weight)
        ctx.geometry, ctx.has_bias = (stride, padding, dilation), bias is not None
        return F.conv2d(images, weight, bias, stride, padding, dilation, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        images, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        grad_images = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_images = torch.ops.aten.convolution_backward(
                grad_output, images, weight, None, stride, padding, dilation, False, [0, 0], weight.shape[0],
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            kernel = tuple(weight.shape[-2:])
            grad_weight = depthwise_weight_gradient(grad_output, images, kernel, stride, padding, dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=(0, 2, 3))
        return grad_images, grad_weight, grad_bias, None, None, None


def pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """A convolution's stride, padding or dilation as (height, width), as ``conv2d`` reads an int."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _small_depthwise(images, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> tuple | None:
    """The arguments of :class:`SmallDepthwiseConv` when this ``conv2d`` call is one it should take, else None."""
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.device.type == "cpu"):
        return None
    if isinstance(padding, str) or not weight.requires_grad:
        return None
    depthwise = groups == images.shape[1] == weight.shape[0] and weight.shape[1] == 1
    if not depthwise or max(images.shape[-2:]) > MAX_INPUT_SIDE:
        return None
    return images, weight, bias, pair(stride), pair(padding), pair(dilation)


class SmallDepthwiseGradients(TorchFunctionMode):
    """While active, ``conv2d`` calls of small depthwise layers go through :class:`SmallDepthwiseConv`."""

    def __torch_function__(self, func, types, args: tuple = (), kwargs: dict[str, Any] | None = None):
        kwargs = kwargs or {}
        if func is torch.conv2d and (arguments := _small_depthwise(*args, **kwargs)) is not None:
            return SmallDepthwiseConv.apply(*arguments)
        return func(*args, **kwargs)


def use_small_depthwise_gradients(network: nn.Module) -> None:
    """Run ``network``'s training-mode forward passes on CPU tensors that take gradients under
    :class:`SmallDepthwiseGradients` (hooks: the module and its state_dict stay as they are; evaluation, exports
    and compiled graphs do not see it)."""
    active: list[SmallDepthwiseGradients] = []

    def enter(module: nn.Module, args: tuple) -> None:
        on_cpu = (
            bool(args) and isinstance(args[0], Tensor) and args[0].device.type == "cpu"
        )  # no per-op dispatch on GPUs
        if on_cpu and module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            active.append(SmallDepthwiseGradients())
            active[-1].__enter__()

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    network.register_forward_pre_hook(enter)
    network.register_forward_hook(leave, always_call=True)
