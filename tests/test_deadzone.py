"""CoDeQ's dead-zone quantizer (slope_bench.deadzone): formulas, levels, gradients, exact hardening."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slope_bench.deadzone import (
    bits_from_logit,
    dead_zone_apply,
    dead_zone_grid,
    dead_zone_harden,
    dead_zone_quantize,
    dead_zone_width,
    percentile_abs,
)
from slope_bench.quant import UniformGrid, fake_quantize, fp16_exact


def away_from_boundaries(
    weight: torch.Tensor,
    step: torch.Tensor,
    offset: torch.Tensor,
    width: torch.Tensor,
    margin: float = 1e-4,
) -> torch.Tensor:
    """Mask of weights not within ``margin·s`` of a rounding boundary or of ``d/2``."""
    u = (weight.abs() - offset) / step
    frac = (u - u.floor() - 0.5).abs()
    return (frac > margin) & ((weight.abs() - width / 2).abs() > margin * step)


@pytest.mark.parametrize("theta_d", [3.0, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_zero_band_is_exactly_the_dead_zone(theta_d: float, bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(4000) * 0.05
    a = percentile_abs(w, 99.0)
    th = torch.tensor(theta_d)
    out = dead_zone_quantize(w, th, bits, a)
    width = dead_zone_width(th, a)
    step, offset, _ = dead_zone_grid(a, width, bits)
    ok = away_from_boundaries(w, step, offset, width)
    assert ok.float().mean() > 0.99
    assert torch.equal((out == 0)[ok], (w.abs() < width / 2)[ok])
    # nonzero outputs keep the sign of the weight and never exceed a
    nz = out != 0
    assert torch.equal(torch.sign(out[nz]), torch.sign(w[nz]))
    assert out.abs().max() <= a * (1 + 1e-6)


@pytest.mark.parametrize("theta_d", [3.0, 1.0, 0.3])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_evenly_spaced_with_top_level_a(theta_d: float, bits: int) -> None:
    w = torch.linspace(-1.3, 1.3, 20001)  # dense enough to hit every level
    a = percentile_abs(w, 99.0)
    th = torch.tensor(theta_d)
    out = dead_zone_quantize(w, th, bits, a)
    width = dead_zone_width(th, a)
    step, offset, qmax = dead_zone_grid(a, width, bits)
    levels = out[out > 0].unique()
    q = 2 ** (bits - 1) - 1
    assert float(qmax) == q
    assert levels.numel() == q
    assert torch.allclose(levels.max(), a, rtol=1e-6)
    expected = width / 2 + step * (torch.arange(1, q + 1, dtype=torch.float32) - 0.5)
    assert torch.allclose(levels, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(
        levels,
        offset + step * torch.arange(1, q + 1, dtype=torch.float32),
        rtol=1e-5,
        atol=1e-7,
    )
    if q > 1:
        assert torch.allclose(levels.diff(), step.expand(q - 1), rtol=1e-4)
    assert torch.allclose(out[out < 0].unique(), -levels.flip(0), rtol=1e-6)
    assert (out.unique().numel()) == 2 * q + 1


def test_percentile_nearest_rank_knob() -> None:
    w = -torch.arange(1.0, 101.0)  # |w| = 1..100
    assert percentile_abs(w, 99.0, "nearest_rank").item() == 99.0
    assert percentile_abs(w, 100.0, "nearest_rank").item() == 100.0
    assert percentile_abs(w, 0.5, "nearest_rank").item() == 1.0
    assert percentile_abs(w, 50.0, "nearest_rank").item() == 50.0
    with pytest.raises(ValueError, match="interpolation"):
        percentile_abs(w, 99.0, "midpoint")


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 4608])
@pytest.mark.parametrize("q", [0.5, 50.0, 99.0, 99.9, 100.0])
def test_percentile_is_numpy_linear(n: int, q: float) -> None:
    """CoDeQ's reference takes the linearly interpolated percentile (numpy's default,
    torch.quantile's): position ``q/100 · (n − 1)`` in the sorted ``|w|``."""
    w = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = float(np.percentile(w.abs().numpy(), q))  # method="linear"
    assert percentile_abs(w, q).item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert percentile_abs(w, q).item() == pytest.approx(float(torch.quantile(w.abs(), q / 100)), rel=1e-12, abs=1e-15)
    w32 = w.float()
    assert percentile_abs(w32, q).dtype == torch.float32
    assert percentile_abs(w32, q).item() == pytest.approx(float(np.percentile(w32.abs().numpy(), q)), rel=1e-6)


def test_percentile_linear_by_hand() -> None:
    w = -torch.arange(1.0, 101.0)  # |w| = 1..100: position 0.99 · 99 = 98.01 → 99 + 0.01 · (100 − 99)
    assert percentile_abs(w.double(), 99.0).item() == pytest.approx(99.01, abs=1e-12)
    assert percentile_abs(w, 100.0).item() == 100.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_width_equal_to_step_is_the_symmetric_quantizer(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 16, 3, 3) * 0.1
    a = percentile_abs(w, 99.0)
    q = 2 ** (bits - 1) - 1
    # choose θ_d so that d = a / Q, which makes d = s (and δ = 0)
    theta_d = torch.tensor(math.atanh(1 - 1 / (2 * q)), dtype=torch.float64)
    width = dead_zone_width(theta_d, a.double())
    step, offset, _ = dead_zone_grid(a.double(), width, bits)
    assert torch.allclose(step, width, rtol=1e-9)
    assert torch.allclose(step, a.double() / q, rtol=1e-9)
    assert abs(float(offset)) < 1e-12
    ours = dead_zone_quantize(w.double(), theta_d, bits, a.double())
    grid = UniformGrid(bits=bits, kind="symmetric", granularity="tensor")
    plain = fake_quantize(w.double(), (a.double() / q).reshape(1, 1), grid)
    assert torch.allclose(ours, plain, atol=1e-12)
    # same identity straight from the width
    ours_width = dead_zone_apply(w.double(), step, offset, torch.tensor(float(q), dtype=torch.float64))
    assert torch.allclose(ours_width, plain, atol=1e-12)


def test_gradients_reach_weight_and_both_logits() -> None:
    torch.manual_seed(2)
    w = (torch.randn(64, 32) * 0.1).requires_grad_()
    theta_d = torch.tensor(1.0, requires_grad=True)
    theta_b = torch.tensor(0.6, requires_grad=True)
    target = torch.randn(64, 32) * 0.1
    a = percentile_abs(w, 99.0)
    out = dead_zone_quantize(w, theta_d, bits_from_logit(theta_b), a)
    (out - target).pow(2).sum().backward()
    for g in (w.grad, theta_d.grad, theta_b.grad):
        assert g is not None and torch.isfinite(g).all()
    assert float(theta_d.grad.abs()) > 0
    assert float(theta_b.grad.abs()) > 0
    # round, clamp and ReLU are straight-through: dŴ/dW = 1 everywhere, dead zone included
    assert torch.allclose(w.grad, 2 * (out.detach() - target), atol=1e-6)
    assert a.grad_fn is None  # a carries no gradient


def reference_quantize(weight: torch.Tensor, theta_d: torch.Tensor, bits: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The formulas composed step by step with plain autograd (STE as ``x + (f(x) − x).detach()``)."""

    def ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return x + (value - x).detach()

    width = 2 * a * (1 - torch.tanh(theta_d).abs())
    qmax = 2 ** (bits - 1) - 1
    step = (a - width / 2) / (qmax - 0.5)
    offset = width / 2 - step / 2
    magnitude = weight.abs() - offset
    x = torch.sign(weight) * ste(magnitude, torch.relu(magnitude)) / step
    rounded = ste(x, torch.round(x))
    bound = float(qmax.detach())
    q = ste(rounded, torch.clamp(rounded, -bound, bound))
    return step * q + offset * torch.sign(q).detach()


@pytest.mark.parametrize("theta", [(2.0, 3.0), (0.7, 0.3), (0.2, 0.1)])
def test_fused_gradients_match_plain_autograd(theta: tuple[float, float]) -> None:
    torch.manual_seed(5)
    base = torch.randn(32, 8, 3, 3, dtype=torch.float64) * 0.05
    target = torch.randn_like(base) * 0.05
    grads, outs = [], []
    for fn in (dead_zone_quantize, reference_quantize):
        w = base.clone().requires_grad_()
        theta_d = torch.tensor(theta[0], dtype=torch.float64, requires_grad=True)
        theta_b = torch.tensor(theta[1], dtype=torch.float64, requires_grad=True)
        out = fn(w, theta_d, bits_from_logit(theta_b), percentile_abs(w, 99.0))
        (out - target).pow(3).sum().backward()
        outs.append(out.detach())
        grads.append((w.grad, theta_d.grad, theta_b.grad))
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    for ours, ref in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_bits_stay_in_two_to_eight() -> None:
    theta = torch.linspace(-50, 50, 2001, requires_grad=True)
    b = bits_from_logit(theta)
    assert b.min().item() == 2.0 and b.max().item() == 8.0
    assert torch.equal(b, b.round())
    assert bits_from_logit(torch.tensor(3.0)).item() == 8.0  # the paper's initial θ_b
    b.sum().backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_closed_dead_zone_keeps_only_the_top_percent() -> None:
    torch.manual_seed(3)
    w = torch.randn(10000)
    a = percentile_abs(w, 99.0)
    out = dead_zone_quantize(w, torch.tensor(0.0), 4, a)  # d = 2a
    assert torch.isfinite(out).all()
    nz = out[out != 0]
    assert torch.allclose(nz.abs(), a.expand_as(nz))
    assert abs((out != 0).float().mean().item() - 0.01) < 2e-3


def test_harden_is_exact_from_16_bit_numbers() -> None:
    torch.manual_seed(4)
    w = torch.randn(32, 16, 3, 3) * 0.03
    a = percentile_abs(w, 99.0)
    width = dead_zone_width(torch.tensor(0.8), a)
    out, s16, d16 = dead_zone_harden(w, a, width, 3)
    assert float(s16) == float(fp16_exact(s16)) and float(d16) == float(fp16_exact(d16))
    q = torch.round((out - d16 * torch.sign(out)) / s16)
    assert torch.equal(out, s16 * q + d16 * torch.sign(q))
    assert q.abs().max() <= 3 and out.unique().numel() <= 7
    # the 16-bit grid stays within fp16 rounding of the trained one
    soft = dead_zone_quantize(w, torch.tensor(0.8), 3, a)
    assert torch.equal(out == 0, soft == 0)
    off = (out - soft).abs() > 4e-3 * float(a)  # a weight within fp16 rounding of a level boundary may move one step
    assert int(off.sum()) <= 0.001 * w.numel() and bool(((out - soft).abs()[off] <= 1.01 * float(s16)).all())
