"""``models.SmallMapConv2d``: ResNet-18's tiny late maps trained as one matrix product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slope_bench import models
from slope_bench.metrics import count_macs
from slope_bench.models import SmallMapConv2d, conv2d_as_matrix, conv_matrix_taps, resnet18

# (channels, out channels, map height, map width, kernel, stride, padding, dilation)
SHAPES = [
    (8, 6, 1, 1, 3, 1, 1, 1),  # a 'same' 3x3 on one pixel: only the centre tap
    (8, 6, 2, 2, 3, 1, 1, 1),
    (8, 6, 2, 2, 3, 2, 1, 1),  # ResNet's stride-2 block entry: 2x2 -> 1x1
    (5, 4, 3, 4, 3, 2, 1, 1),  # not square
    (5, 4, 4, 4, 5, 1, 2, 1),
    (5, 4, 3, 3, 3, 1, 0, 1),  # no padding
    (5, 4, 4, 4, 3, 1, 2, 2),  # dilation
    (5, 4, 2, 2, 1, 2, 0, 1),  # 1x1 kernel
]


@pytest.mark.parametrize("c_in, c_out, h, w, k, stride, pad, dil", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d_as_matrix_is_the_convolution_with_its_gradients(c_in, c_out, h, w, k, stride, pad, dil, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, c_in, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    args = ((stride, stride), (pad, pad), (dil, dil))
    expected = F.conv2d(x, weight, b, *args)
    got = conv2d_as_matrix(x, weight, b, *args)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    inputs = (x, weight) if b is None else (x, weight, b)
    for g_got, g_expected in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(expected, inputs, upstream), strict=True):
        torch.testing.assert_close(g_got, g_expected, rtol=1e-12, atol=1e-12)


def test_conv_matrix_taps_on_one_pixel_is_the_centre_tap():
    taps, out_h, out_w, complete = conv_matrix_taps(1, 1, (3, 3), (1, 1), (1, 1), (1, 1))
    assert (out_h, out_w, complete) == (1, 1, True) and taps.tolist() == [[4]]
    taps, *_, complete = conv_matrix_taps(2, 2, (3, 3), (2, 2), (1, 1), (1, 1))
    assert taps.tolist() == [[4, 5, 7, 8]] and complete  # output (0, 0) reaches the top-left 2x2 of the kernel's lower right
    taps, *_, complete = conv_matrix_taps(3, 3, (3, 3), (1, 1), (1, 1), (1, 1))
    assert not complete and taps[0, 8].item() == 9  # a corner output does not reach the opposite corner


def counting(monkeypatch) -> list:
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return conv2d_as_matrix(*args)

    monkeypatch.setattr(models, "conv2d_as_matrix", counted)
    return calls


@pytest.mark.parametrize(
    "size, kernel, padding, fast",
    [(1, 3, 1, True), (2, 3, 1, True), (3, 3, 1, False), (2, 1, 0, False), (1, 3, "same", False)],
)
def test_small_map_conv_takes_the_matrix_only_in_training_on_small_maps(monkeypatch, size, kernel, padding, fast):
    calls = counting(monkeypatch)
    torch.manual_seed(0)
    conv = SmallMapConv2d(4, 6, kernel, padding=padding, bias=True)
    plain = nn.Conv2d(4, 6, kernel, padding=padding, bias=True)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(5, 4, size, size)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == int(fast)
    conv.eval()
    assert torch.equal(conv(x), plain(x))  # evaluation runs the convolution itself
    assert len(calls) == int(fast)


def test_small_map_conv_trains_a_parametrized_weight(monkeypatch):
    """A compressor's parametrization wraps the weight: the matrix is built from the
    parametrized tensor and the gradient reaches the original one."""
    calls = counting(monkeypatch)

    class Half(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 0.5 * w

    torch.manual_seed(0)
    conv = SmallMapConv2d(4, 6, 3, padding=1, bias=False)
    plain = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    plain.load_state_dict(conv.state_dict())
    for module in (conv, plain):
        parametrize.register_parametrization(module, "weight", Half())
    assert isinstance(conv, SmallMapConv2d)
    x = torch.randn(5, 4, 2, 2)
    conv(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert len(calls) == 1
    original = conv.parametrizations.weight.original
    torch.testing.assert_close(original.grad, plain.parametrizations.weight.original.grad, rtol=1e-5, atol=1e-6)
    parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is SmallMapConv2d


def test_resnet18_on_8x8_trains_its_late_stages_as_matrices_and_counts_the_same_macs(monkeypatch):
    calls = counting(monkeypatch)
    torch.manual_seed(0)
    fast = resnet18(10, in_chans=1, image_size=8, width=4)
    torch.manual_seed(0)
    plain = resnet18(10, in_chans=1, image_size=8, width=4)
    for module in plain.modules():
        if type(module) is SmallMapConv2d:
            module.__class__ = nn.Conv2d
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(type(m) is SmallMapConv2d for m in convs)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values(), strict=True))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for model in (fast, plain):
        F.cross_entropy(model(x), y).backward()
    # layer3 (2x2 maps): conv1 from 4x4 keeps the convolution, conv2 + block 2: 3; layer4: 4 (its 1x1 downsample kernel does not)
    assert len(calls) == 7
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    example = torch.randn(1, 1, 8, 8)
    assert count_macs(fast, example) == count_macs(plain, example)
