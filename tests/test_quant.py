import math

import pytest
import torch

from slope_bench.quant import (
    FP16_TINY,
    MIN_SCALE,
    UniformGrid,
    codes,
    fake_quantize,
    fp16_exact,
    grad_scale,
    grid_codes,
    grid_values,
    group_rows,
    grouped,
    harden,
    init_lsq_step,
    keep_masked,
    rtn_step,
    sqnr_db,
    ste_round,
)


@pytest.mark.parametrize("bits", range(1, 9))
def test_level_count_per_channel(bits):
    grid = UniformGrid(bits)
    w = torch.randn(16, 64) * 3
    out = harden(w, rtn_step(w, grid), grid)
    for row in out:
        assert len(torch.unique(row)) <= grid.max_levels
        positive = torch.unique(row[row > 0])
        assert len(positive) <= max(2 ** (bits - 1) - 1, 1)


def test_harden_values_are_integer_codes_times_fp16_scales():
    grid = UniformGrid(4)
    w = torch.randn(8, 32)
    step = init_lsq_step(w, grid)
    out = harden(w, step, grid)
    s16 = fp16_exact(step)
    q = out / s16
    assert torch.equal(q, torch.round(q))
    assert q.abs().max() <= grid.qmax
    assert torch.equal(fp16_exact(s16), s16)


def test_ste_round_passes_gradient_through():
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    ste_round(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_grad_scale_is_identity_forward_scaled_backward():
    x = torch.tensor([2.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert x.grad.item() == pytest.approx(0.25)


def test_lsq_step_learns_towards_lower_error():
    torch.manual_seed(0)
    grid = UniformGrid(3)
    w = torch.randn(4, 256)
    step = torch.nn.Parameter(init_lsq_step(w, grid) * 3)  # badly initialised
    opt = torch.optim.Adam([step], lr=1e-2)
    first = None
    for _ in range(100):
        err = (fake_quantize(w, grad_scale(step, 1 / math.sqrt(w.numel() * grid.qmax)), grid) - w).pow(2).mean()
        first = first if first is not None else err.item()
        opt.zero_grad()
        err.backward()
        opt.step()
    assert err.item() < 0.7 * first


def test_fake_quantize_gradient_flows_to_weight_and_step():
    grid = UniformGrid(4)
    w = torch.randn(4, 8, requires_grad=True)
    step = torch.nn.Parameter(init_lsq_step(w, grid))
    fake_quantize(w, step, grid).pow(2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert step.grad is not None and step.grad.abs().sum() > 0


def test_asymmetric_and_group_granularity():
    grid = UniformGrid(4, symmetric=False)
    assert (grid.qmin, grid.qmax) == (0, 15)
    g = UniformGrid(4, granularity="group", group_size=8)
    w = torch.randn(4, 32)
    assert init_lsq_step(w, g).shape == (16, 1)
    assert codes(w, init_lsq_step(w, g), g).shape == w.shape


def test_sqnr():
    w = torch.ones(100)
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(w, w * 0.9) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9), dict(granularity="row")])
def test_grid_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        UniformGrid(**bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_lsq_gives_lsq_values_and_gradients(bits):
    """Values: clamp(round(w/s))·s; ∂/∂w = 1 where round(w/s) is in range, else 0;
    ∂/∂s = round(v) − v inside, the clamp bound outside (Esser et al. 2020, Eq. 3)."""
    torch.manual_seed(bits)
    grid = UniformGrid(bits)
    w = (torch.randn(6, 40) * 2).requires_grad_()
    step = torch.nn.Parameter(init_lsq_step(w, grid) * 0.5)  # small steps: some weights clamp
    g = torch.randn(6, 40)
    out = fake_quantize(w, step, grid)
    v = (w / step).detach()
    r = torch.round(v)
    inside = (r >= grid.qmin) & (r <= grid.qmax)
    assert torch.allclose(out, torch.clamp(r, grid.qmin, grid.qmax) * step)
    out.backward(g)
    assert torch.equal(w.grad, g * inside)
    expected_step = (g * torch.where(inside, r - v, torch.clamp(r, grid.qmin, grid.qmax))).sum(1, keepdim=True)
    assert torch.allclose(step.grad, expected_step, rtol=1e-5, atol=1e-5)
    assert (~inside).any() or bits == 8  # the clamp is exercised at low bit widths


@pytest.mark.parametrize(
    "shape,granularity,group_size,rows",
    [
        ((8, 4, 3, 3), "channel", 0, (8, 36)),
        ((8, 4, 3, 3), "tensor", 0, (1, 288)),
        ((8, 4, 3, 3), "group", 12, (24, 12)),
        ((8, 4, 3, 3), "group", 10, (8, 36)),  # does not split evenly: per channel
        ((8, 4, 3, 3), "group", 0, (8, 36)),  # no group size (an accounting spec's default)
        ((36,), "channel", 0, (1, 36)),
        ((36,), "group", 12, (3, 12)),
    ],
)
def test_group_rows_is_the_one_grouping(shape, granularity, group_size, rows):
    w = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    out = group_rows(w, granularity, group_size)
    assert tuple(out.shape) == rows and torch.equal(out.flatten(), w.flatten())
    if group_size:
        assert torch.equal(grouped(w, UniformGrid(4, granularity=granularity, group_size=group_size)), out)


def test_grid_codes_and_values_with_and_without_zero_point():
    grid = UniformGrid(3)
    v = torch.tensor([[-1.0, -0.26, 0.0, 0.24, 0.9]])
    step = torch.tensor([[0.25]])
    q = grid_codes(v, step, grid)
    assert q.tolist() == [[-3.0, -1.0, 0.0, 1.0, 3.0]]
    assert torch.equal(grid_values(q, step), q * step)
    asym = UniformGrid(2, symmetric=False)
    zero = torch.tensor([[1.0]])
    qa = grid_codes(v, step, asym, zero)
    assert qa.tolist() == [[0.0, 0.0, 1.0, 2.0, 3.0]]
    assert torch.equal(grid_values(qa, step, zero), (qa - 1) * 0.25)
    binary = grid_codes(torch.tensor([-0.5, 0.0, 2.0], dtype=torch.float64), step, UniformGrid(1))
    assert binary.tolist() == [-1.0, 1.0, 1.0] and binary.dtype == torch.float64


def test_harden_floors_the_step_at_the_smallest_normal_fp16():
    grid = UniformGrid(4)
    w = torch.full((2, 8), 1e-7)
    out = harden(w, torch.full((2, 1), 1e-9), grid)
    assert float(fp16_exact(torch.tensor(MIN_SCALE))) > 0
    assert torch.equal(out, torch.zeros_like(w))  # 1e-7 / 6.1e-5 rounds to code 0
    assert 0 < FP16_TINY < MIN_SCALE and float(fp16_exact(torch.tensor(FP16_TINY))) == FP16_TINY


def test_keep_masked_zeroes_forward_and_passes_gradient():
    out = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0])
    y = keep_masked(out, mask)
    assert y.tolist() == [1.0, 0.0, 3.0]
    y.sum().backward()
    assert out.grad.tolist() == [1.0, 1.0, 1.0]
