import math

import pytest
import torch

from slope_bench.quant import (
    FP16_TINY,
    MIN_SCALE,
    UniformGrid,
    codes,
    fake_quantize,
    fit_grid,
    fp16_exact,
    grad_scale,
    grid_codes,
    grid_values,
    group_rows,
    grouped,
    harden,
    init_lsq_step,
    keep_masked,
    masked_fake_quantize,
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


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", ["symmetric", "signed", "asymmetric"])
def test_level_sets(bits, kind):
    """The integer level sets: symmetric ``±(2^(b−1)−1)`` (2^b − 1 levels), signed
    ``[−2^(b−1), 2^(b−1)−1]`` and asymmetric ``0..2^b−1`` (2^b levels: "w2" = 4 levels);
    a tensor that spans the range uses exactly them, and ``harden`` reproduces them."""
    grid = UniformGrid(bits, kind)
    expected = {
        "symmetric": range(-(2 ** (bits - 1) - 1), 2 ** (bits - 1)),
        "signed": range(-(2 ** (bits - 1)), 2 ** (bits - 1)),
        "asymmetric": range(0, 2**bits),
    }[kind]
    assert list(range(grid.qmin, grid.qmax + 1)) == list(expected)
    assert grid.max_levels == len(expected) == (2**bits - 1 if kind == "symmetric" else 2**bits)
    values = torch.linspace(-300.0, 300.0, 2001).reshape(1, -1)
    assert torch.unique(grid_codes(values, torch.ones(1, 1), grid)).tolist() == [float(c) for c in expected]
    scale, zero = fit_grid(values, grid, "minmax")
    out = harden(values, scale, grid, zero=zero)
    assert torch.unique(out).numel() >= grid.max_levels - 1  # the fp16 scale / rounded zero point may leave one end code unused
    assert torch.unique(out).numel() <= grid.max_levels
    assert bool((out == 0).any()) and (zero.item() == 0) == (kind != "asymmetric")


@pytest.mark.parametrize("kind", ["symmetric", "signed", "asymmetric"])
@pytest.mark.parametrize("range_", ["minmax", "mse"])
def test_fit_grid(kind, range_):
    """min-max: symmetric ``R/qmax``, signed ``2R/(2^b−1)`` (the OBC/GPTQ ``sym`` rule),
    asymmetric ``(max − min)/(2^b−1)`` with ``z = round(−min/s)``; mse: the shrink factor
    in 1.00 … 0.21 with the least ``Σ|q(w) − w|^2.4``, never worse than min-max."""
    torch.manual_seed(0)
    w = torch.randn(8, 64, dtype=torch.float64) * torch.rand(8, 1, dtype=torch.float64) + 0.3
    grid = UniformGrid(3, kind)
    scale, zero = fit_grid(w, grid, range_)
    assert torch.equal(scale, fp16_exact(scale)) and scale.shape == (8, 1)

    def error(s, z):
        return (
            (grid_values(grid_codes(w, s, grid, z if grid.zero_point else None), s, z if grid.zero_point else None) - w)
            .abs()
            .pow(2.4)
            .sum(1)
        )

    low, high = w.amin(1, keepdim=True).clamp_max(0), w.amax(1, keepdim=True).clamp_min(0)
    if kind == "asymmetric":
        expected = (high - low) / 7
    elif kind == "signed":
        expected = 2 * torch.maximum(-low, high) / 7
    else:
        expected = torch.maximum(-low, high) / 3
    minmax_scale, minmax_zero = fit_grid(w, grid, "minmax")
    assert torch.equal(minmax_scale, fp16_exact(expected))
    if kind == "asymmetric":
        assert torch.equal(minmax_zero, torch.round(-low / minmax_scale))
    if range_ == "mse":
        assert (error(scale, zero) <= error(minmax_scale, minmax_zero) + 1e-12).all()
        assert (scale <= minmax_scale).all() and (scale >= 0.2 * minmax_scale).all()
        # brute force over the 80 candidates of the reference search
        for r in range(8):
            best = min(
                range(80),
                key=lambda i: (
                    float(error(*[t[r : r + 1].expand(8, 1) for t in fit_grid(w * (1 - i / 100), grid, "minmax")])[r]),
                    i,
                ),
            )
            shrunk, z = fit_grid(w * (1 - best / 100), grid, "minmax")
            assert scale[r].item() == shrunk[r].item() and zero[r].item() == z[r].item()


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
    grid = UniformGrid(4, "asymmetric")
    assert (grid.qmin, grid.qmax) == (0, 15)
    g = UniformGrid(4, granularity="group", group_size=8)
    w = torch.randn(4, 32)
    assert init_lsq_step(w, g).shape == (16, 1)
    assert codes(w, init_lsq_step(w, g), g).shape == w.shape


def test_sqnr():
    w = torch.ones(100)
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(w, w * 0.9) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9), dict(granularity="row"), dict(kind="unsigned")])
def test_grid_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        UniformGrid(**bad)


@pytest.mark.parametrize("kind", ["signed", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_lsq_gives_lsq_values_and_gradients(bits, kind):
    """Values: clamp(round(v))·s; LSQ's Eq. 3 with the clip decided on ``v = w/s``:
    ``qmin < v < qmax``: ∂/∂w = 1, ∂/∂s = round(v) − v; else ∂/∂w = 0, ∂/∂s = the bound."""
    torch.manual_seed(bits)
    grid = UniformGrid(bits, kind)
    w = (torch.randn(6, 40) * 2).requires_grad_()
    step = torch.nn.Parameter(init_lsq_step(w, grid) * 0.5)  # small steps: some weights clamp
    g = torch.randn(6, 40)
    out = fake_quantize(w, step, grid)
    v = (w / step).detach()
    r = torch.round(v)
    inside = (v > grid.qmin) & (v < grid.qmax)
    assert torch.allclose(out, torch.clamp(r, grid.qmin, grid.qmax) * step)
    out.backward(g)
    assert torch.equal(w.grad, g * inside)
    expected_step = (g * torch.where(inside, r - v, torch.where(v <= grid.qmin, float(grid.qmin), float(grid.qmax)))).sum(1, keepdim=True)
    assert torch.allclose(step.grad, expected_step, rtol=1e-5, atol=1e-5)
    assert (~inside).any() or bits == 8  # the clamp is exercised at low bit widths


# Hand-computed LSQ Eq. 3 (s = 1, upstream gradient 1): (w, grid, ∂w, ∂s). The band
# qmax < v < qmax + 0.5 (e.g. 3.3 at 3 bits) rounds to qmax but is outside the clip range.
EQ3_CASES = [
    ([3.3, 0.6], UniformGrid(3, "symmetric"), [0.0, 1.0], 3.0 + 0.4),  # the example
    ([3.3, 0.6], UniformGrid(3), [0.0, 1.0], 3.0 + 0.4),  # signed: qmax = 3 too
    ([-4.3, -3.7, 2.2], UniformGrid(3), [0.0, 1.0, 1.0], -4.0 + (-0.3) + (-0.2)),  # signed qmin = −4
    ([-3.2, 1.4, 0.5], UniformGrid(3, "symmetric"), [0.0, 1.0, 1.0], -3.0 + (-0.4) + (0.0 - 0.5)),
    ([1.2, -1.6, -2.4, 0.4], UniformGrid(2), [0.0, 1.0, 0.0, 1.0], 1.0 + (-2.0 + 1.6) + (-2.0) + (0.0 - 0.4)),  # {−2..1}
    ([1.2, -1.2, 0.6], UniformGrid(2, "symmetric"), [0.0, 0.0, 1.0], 1.0 - 1.0 + (1.0 - 0.6)),  # ternary
    ([7.4, -8.2, 6.6, -7.5], UniformGrid(4), [0.0, 0.0, 1.0, 1.0], 7.0 - 8.0 + (7.0 - 6.6) + (-8.0 + 7.5)),
    ([7.4, -7.4, 0.2], UniformGrid(4, "symmetric"), [0.0, 0.0, 1.0], 7.0 - 7.0 + (0.0 - 0.2)),
]


@pytest.mark.parametrize(("w", "grid", "grad_w", "grad_s"), EQ3_CASES)
def test_lsq_eq3_by_hand_both_kernels(w, grid, grad_w, grad_s):
    """Element by element at 2, 3, 4 bits, for ``fake_quantize`` (``_LSQRoundClamp``) and
    the fused SR-STE+LSQ kernel (mask all kept, no decay)."""
    for fused in (False, True):
        weight = torch.tensor([w], dtype=torch.float64, requires_grad=True)
        step = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
        if fused:
            out = masked_fake_quantize(weight, torch.ones_like(weight, dtype=torch.bool), step, grid, 0.0)
        else:
            out = fake_quantize(weight, step, grid)
        out.sum().backward()
        assert weight.grad[0].tolist() == grad_w, fused
        assert step.grad.item() == pytest.approx(grad_s, abs=1e-12), fused
        assert out[0].tolist() == torch.clamp(torch.round(torch.tensor(w)), grid.qmin, grid.qmax).tolist()


def test_lsq_gradient_at_the_bounds_is_the_bound():
    """Eq. 3 at ``v = qmax`` and ``v = qmin`` exactly: ∂s is the bound, ∂w is 0."""
    weight = torch.tensor([[3.0, -4.0, 2.5]], requires_grad=True)
    step = torch.ones(1, 1, requires_grad=True)
    fake_quantize(weight, step, UniformGrid(3)).sum().backward()
    assert weight.grad.tolist() == [[0.0, 0.0, 1.0]]
    assert step.grad.item() == pytest.approx(3.0 - 4.0 + (2.0 - 2.5))


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
    grid = UniformGrid(3, "symmetric")
    v = torch.tensor([[-1.0, -0.26, 0.0, 0.24, 0.9]])
    step = torch.tensor([[0.25]])
    q = grid_codes(v, step, grid)
    assert q.tolist() == [[-3.0, -1.0, 0.0, 1.0, 3.0]]
    assert torch.equal(grid_values(q, step), q * step)
    asym = UniformGrid(2, "asymmetric")
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
