"""oneDNN's depthwise weight gradient against ours (``transfer_lightning.network.depthwise``), in one process.

    python benchmarks/depthwise_gradient.py --image-size 32
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/depthwise_gradient.py   # AVX2 kernels

First, per depthwise layer of a channels-last MobileNetV2 at ``--image-size`` (batch ``--batch-size``): the time of
oneDNN's weight gradient (``aten.convolution_backward``) and of ours (one multiply-and-sum per kernel tap), and
which one the network uses. Then SGD training steps of the whole network on random images, torchvision's plain
network and ours (the same weights) taking turns, and the ratio of their images/s. The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.network import create_network  # noqa: E402
from transfer_lightning.network.depthwise import MAX_INPUT_SIDE, depthwise_weight_gradient  # noqa: E402


def milliseconds(function, repeats: int = 5) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1000


def layer_times(module: torch.nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Milliseconds of oneDNN's weight gradient of this depthwise layer, and of ours."""
    grad = torch.randn_like(out)
    geometry = (module.stride, module.padding, module.dilation)
    arguments = (grad, x, module.weight, None, *geometry, False, [0, 0], module.groups, [False, True, False])
    onednn = milliseconds(lambda: torch.ops.aten.convolution_backward(*arguments))  # the weight gradient only
    ours = milliseconds(lambda: depthwise_weight_gradient(grad, x, module.kernel_size, *geometry))
    return onednn, ours


def layer_table(network: torch.nn.Module, images: torch.Tensor) -> None:
    seen = {}

    def record(module, args, output) -> None:
        seen[module] = (args[0], output)

    depthwise = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    hooks = [m.register_forward_hook(record) for m in depthwise]
    with torch.no_grad():
        network.eval()(images)
    for hook in hooks:
        hook.remove()
    print("| channels | input | stride | oneDNN ms | ours ms | used |\n| ---: | --- | ---: | ---: | ---: | --- |")
    totals = [0.0, 0.0]
    for module in depthwise:
        x, out = seen[module]
        onednn, ours = layer_times(module, x, out)
        used = "ours" if max(x.shape[-2:]) <= MAX_INPUT_SIDE else "oneDNN"
        totals[0] += onednn
        totals[1] += ours if used == "ours" else onednn
        side = f"{x.shape[-2]}x{x.shape[-1]}"
        print(f"| {module.in_channels} | {side} | {module.stride[0]} | {onednn:.2f} | {ours:.2f} | {used} |")
    print(f"all depthwise weight gradients: oneDNN {totals[0]:.1f} ms, as the network runs them {totals[1]:.1f} ms\n")


def training_step(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """One SGD step of ``network`` (channels-last, training mode) on the batch, as a function."""
    network.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(network(images), labels).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="training steps per turn")
    parser.add_argument("--rounds", type=int, default=4, help="turns of each network")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    ours, _ = create_network("mobilenet_v2", None, num_classes=10)
    plain = torchvision.models.mobilenet_v2(num_classes=10)
    plain.load_state_dict(ours.state_dict())
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last
    )  # fmt: skip
    labels = torch.randint(0, 10, (args.batch_size,))
    layer_table(ours.to(memory_format=torch.channels_last), images)

    steps = {name: training_step(network, images, labels) for name, network in (("torchvision", plain), ("ours", ours))}
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # taking turns, so that a slower spell of the machine hits both
        for name, step in steps.items():
            rates[name].append(args.batch_size / (milliseconds(step, args.steps) / 1000))
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name}: {median[name]:.0f} training images/s (median of {', '.join(f'{v:.0f}' for v in values)})")
    ratio = median["ours"] / median["torchvision"]
    print(f"depthwise_gradient image_size={args.image_size} ours_over_plain={ratio:.3f}")


if __name__ == "__main__":
    main()
