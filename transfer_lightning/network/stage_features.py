"""Earlier stages' features for the head: the pooled outputs of chosen backbone modules, next to the last ones.

A frozen backbone's last features are tuned to ImageNet's classes; earlier stages hold more general ones (edges,
textures, parts), and a head that sees both transfers better (Evci et al., "Head2Toe", ICML 2022). With
``model.stage_features [features.6, features.13]`` the output map of each named module is pooled like the last
map (average; average and max for the mlp head), and the classifier block receives all of them concatenated.
They come out of the same forward pass, so the frozen-feature cache stores them like the last features and the
backbone still runs once per fit: measured in docs/guides/frozen-heads.md.

The network keeps its modules and their names; the classifier block is wrapped (``classifier`` becomes
``classifier.block``) by :class:`StageFeatures`, which forward hooks on the named modules hand their pooled outputs.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import Tensor, nn

from transfer_lightning.errors import UserInputError
from transfer_lightning.network.freezing import find_module
from transfer_lightning.network.heads import ConcatPool2d, MLPHead
from transfer_lightning.network.parts import NetworkParts


def pool(maps: Tensor, both_ways: bool) -> Tensor:
    """(N, C, H, W) maps -> (N, C) channel averages, or (N, 2C) averages then maxima: the mlp head's
    :class:`~transfer_lightning.network.heads.ConcatPool2d`."""
    return ConcatPool2d()(maps).flatten(1) if both_ways else maps.mean((-2, -1))


class StageFeatures(nn.Module):
    """``block`` (the classifier block) fed its usual input, flattened, with the pooled outputs of ``stages``.

    Forward hooks on the stage modules leave their pooled outputs here during the network's forward pass; this
    module takes them in the order of ``stages``. On cached features it is not called: the frozen-feature cache
    calls ``block``, whose input is the concatenation. One forward pass at a time per network, as Lightning's
    loops, ``predict`` and the server's workers run it (threads sharing one network would mix their stages).
    """

    def __init__(self, block: nn.Module, network: nn.Module, stages: list[str], both_ways: bool) -> None:
        super().__init__()
        self.block, self.stages, self.both_ways = block, list(stages), both_ways
        self._pooled: dict[str, Tensor] = {}
        for name in self.stages:
            # A partial of a bound method, not a closure: copy.deepcopy of the network (the onnxruntime engine's
            # copy) then hands the copied stages' outputs to the copied wrapper.
            network.get_submodule(name).register_forward_hook(partial(self._keep, name))

    def _keep(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._pooled[name] = pool(output, self.both_ways)

    def forward(self, features: Tensor) -> Tensor:
        missing = [name for name in self.stages if name not in self._pooled]
        if missing:
            raise RuntimeError(f"model.stage_features: {', '.join(missing)} did not run in this forward pass.")
        pooled = [self._pooled.pop(name) for name in self.stages]
        return self.block(torch.cat([torch.flatten(features, 1), *pooled], dim=1))


def add_stage_features(
    network: nn.Module, parts: NetworkParts, stages: list[str], both_ways: bool, backbone: str
) -> tuple[nn.Module, NetworkParts]:
    """``network`` with :class:`StageFeatures` of ``stages`` around its classifier block, whose first layer (the head
    or the mlp head) is rebuilt for the wider input, and its ``parts`` renamed to match; refused, in one line, where a
    stage gives no (N, C, H, W) map, the block no flat vector, or the block's first layer is a pretrained one."""
    stages = [find_module(network, name, "model.stage_features") for name in stages]
    side = max([parts.preprocessing.input_size, *(parts.min_size or ())])  # what the weights were made for
    shapes = _probe_shapes(network, stages, parts.classifier_block, side)
    wrong = [name for name in stages if len(shapes[name]) != 4]
    if wrong or len(shapes[parts.classifier_block]) != 2:
        raise UserInputError(
            f"model.stage_features pools (N, C, H, W) maps into the flat features the head receives; in {backbone} "
            f"{', '.join(wrong) or 'the classifier block'} gets other shapes: use a convolutional backbone "
            "(ResNet, RegNet, EfficientNet, MobileNetV2, DenseNet, or a timm CNN), or leave model.stage_features unset."
        )
    head = network.get_submodule(parts.head)
    if head.in_features != shapes[parts.classifier_block][1]:
        raise UserInputError(
            f"model.stage_features widens the head's input, and {backbone}'s classifier block has pretrained layers "
            "before its head: use model.head mlp (it replaces the whole block), or another backbone."
        )
    width = head.in_features + sum((2 if both_ways else 1) * shapes[name][1] for name in stages)
    wider = MLPHead(width, head.out_features) if isinstance(head, MLPHead) else nn.Linear(width, head.out_features)
    network.set_submodule(parts.head, wider)
    block = network.get_submodule(parts.classifier_block)  # the head itself, for mlp
    network.set_submodule(parts.classifier_block, StageFeatures(block, network, stages, both_ways))
    inner = parts.head.removeprefix(parts.classifier_block)  # "" or ".1"
    block_name = f"{parts.classifier_block}.block"
    return network, dataclasses.replace(parts, head=block_name + inner, classifier_block=block_name)


@torch.no_grad()
def _probe_shapes(network: nn.Module, stages: list[str], block: str, side: int) -> dict[str, torch.Size]:
    """The output shapes of ``stages`` and the input shape of ``block`` for one blank image of ``side`` pixels
    squared, in eval mode."""
    shapes: dict[str, torch.Size] = {}

    def keep(name: str, value: object) -> None:  # a hook that returned a value would replace the output
        shapes.setdefault(name, getattr(value, "shape", torch.Size()))

    hooks = [
        network.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: keep(name, out))
        for name in stages
    ]
    hooks.append(network.get_submodule(block).register_forward_pre_hook(lambda m, args: keep(block, args[0])))
    was_training = network.training
    try:
        network.eval()(torch.zeros(1, 3, side, side))
    finally:
        network.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes
