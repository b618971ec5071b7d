"""Depthwise convolutions on tiny inputs: our weight gradient against torch's own, and where it is used."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn import functional as F

from transfer_lightning.network import create_network
from transfer_lightning.network.depthwise import SmallDepthwiseConv


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize(
    ("side", "kernel", "stride", "padding", "dilation", "bias"),
    [
        ((2, 2), 3, 1, 1, 1, False),
        ((1, 1), 3, 1, 1, 1, True),
        ((2, 2), 3, 2, 1, 1, False),
        ((2, 1), 5, 1, 2, 1, True),
        ((2, 2), 3, 1, 2, 2, False),
        ((2, 2), 1, 1, 0, 1, True),
    ],
    ids=["2x2", "1x1-bias", "stride2", "5x5-2x1", "dilation2", "1x1-kernel"],
)
def test_gradients_equal_torchs_convolution(side, kernel, stride, padding, dilation, bias, channels_last):
    torch.manual_seed(0)
    images = torch.randn(6, 8, *side, dtype=torch.float64)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 1, kernel, kernel, dtype=torch.float64)
    bias_values = torch.randn(8, dtype=torch.float64) if bias else None
    inputs = [t.clone().requires_grad_() for t in (images, weight) + ((bias_values,) if bias else ())]
    expected = [t.detach().clone().requires_grad_() for t in inputs]

    ours = SmallDepthwiseConv.apply(
        *inputs[:2], inputs[2] if bias else None, (stride,) * 2, (padding,) * 2, (dilation,) * 2
    )
    theirs = F.conv2d(*expected[:2], expected[2] if bias else None, stride, padding, dilation, groups=8)
    torch.testing.assert_close(ours, theirs)
    grad_output = torch.randn_like(theirs)
    ours.backward(grad_output)
    theirs.backward(grad_output)
    for mine, reference in zip(inputs, expected, strict=True):
        assert reference.grad.abs().max() > 0.1
        torch.testing.assert_close(mine.grad, reference.grad)


def counted_calls(monkeypatch) -> list[int]:
    calls = []
    apply = SmallDepthwiseConv.apply
    monkeypatch.setattr(SmallDepthwiseConv, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


def test_mobilenet_v2_trains_with_the_gradients_of_plain_torch(monkeypatch):
    """At 32 px the depthwise layers of blocks 7-17 see 2x2 and 1x1 inputs: those ten take our weight gradient,
    and every parameter's gradient is the one torchvision's network without it gets."""
    calls = counted_calls(monkeypatch)
    network, _ = create_network("mobilenet_v2", None, num_classes=10)
    plain = torchvision.models.mobilenet_v2(num_classes=10)
    plain.load_state_dict(network.state_dict())
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for model in (network, plain):
        model.train()
        torch.manual_seed(0)  # the same dropout mask in the classifier
        F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels).backward()
    assert len(calls) == 10
    for (name, ours), theirs in zip(network.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_training_passes_that_take_gradients_use_it(monkeypatch):
    calls = counted_calls(monkeypatch)
    network, _ = create_network("mobilenet_v2", None, num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    network.eval()
    network(images).sum().backward()  # Grad-CAM's kind of pass: evaluation mode
    network.train()
    with torch.no_grad():
        network(images)
    network(torch.randn(2, 3, 96, 96)).sum().backward()  # 3x3 and larger: oneDNN's own
    assert calls == []
    network(images).sum().backward()
    assert len(calls) == 10
    assert not torch._C._is_torch_function_mode_enabled()  # the mode ends with the forward pass


def test_a_failing_forward_pass_leaves_no_mode_behind(monkeypatch):
    network, _ = create_network("mobilenet_v2", None, num_classes=10)
    network.train()
    with pytest.raises(RuntimeError):
        network(torch.randn(2, 4, 32, 32))  # four channels: the first convolution refuses
    assert not torch._C._is_torch_function_mode_enabled()


def test_passes_on_other_devices_do_not_enter_the_mode():
    """Every torch call of a pass under the mode goes through Python: only CPU passes pay for it."""
    network, _ = create_network("mobilenet_v2", None, num_classes=10)
    seen = []
    network.features[0].register_forward_pre_hook(lambda m, a: seen.append(torch._C._is_torch_function_mode_enabled()))
    network.train()
    network(torch.randn(2, 3, 32, 32))
    network.to("meta")(torch.randn(2, 3, 32, 32, device="meta"))
    assert seen == [True, False]
