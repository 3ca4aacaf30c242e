"""SLOPE / naive / prune / quantize: the alignment term, SR-STE, the fused kernels, finalize
and bad input."""

import pytest
import torch
from torch import nn

from slope_bench.errors import ConfigError
from slope_bench.loop import drive
from slope_bench.methods.base import RunInfo
from slope_bench.methods.slope import NMQuantWeight, Slope, row_cosine
from slope_bench.quant import _SRSTELSQ, UniformGrid, _LSQRoundClamp, fp16_exact
from slope_bench.sparsity import NM, nm_mask, satisfies_nm
from slope_bench.sparsity import SRSTE as _SRSTE

INFO = RunInfo(num_train=16)


def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 64, 10))
    model.first_layers, model.classifier_layers = ["0"], ["4"]  # targets: ["2"]
    return model


def test_cosine_identity_for_magnitude_mask():
    """For a magnitude N:M mask, cos(w, m ⊙ w) = ‖m ⊙ w‖ / ‖w‖."""
    w = torch.randn(32, 64)
    mw = w * nm_mask(w, NM(2, 4))
    cos = torch.nn.functional.cosine_similarity(w, mw, dim=1)
    assert torch.allclose(cos, mw.norm(dim=1) / w.norm(dim=1), atol=1e-6)


def test_alignment_penalty_is_lambda_mean_one_minus_cos():
    model = toy()
    c = Slope(n=2, m=4, w_bits=None, lam=3.0)
    c.prepare(model, ["2"], INFO)
    w = model[2].parametrizations.weight.original
    w_hat = model[2].weight
    expected = 3.0 * (1 - torch.nn.functional.cosine_similarity(w.reshape(16, -1), w_hat.reshape(16, -1), dim=1)).mean()
    assert float(c.penalty().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    expected_identity = 3.0 * (1 - w_hat.reshape(16, -1).norm(dim=1) / w.reshape(16, -1).norm(dim=1)).mean()
    assert float(c.penalty().detach()) == pytest.approx(float(expected_identity.detach()), rel=1e-4)


def test_penalty_gradient_reaches_weights_and_steps():
    model = toy()
    c = Slope(lam=1.0)
    c.prepare(model, ["2"], INFO)
    model(torch.randn(2, 3, 8, 8))
    c.penalty().backward()
    p = c.layers["2"]
    assert model[2].parametrizations.weight.original.grad.abs().sum() > 0
    assert p.step.grad is not None


def test_none_and_l2_alignments():
    model = toy()
    assert Slope(alignment="none").prepare(model, ["2"], INFO) is model
    model = toy()
    c = Slope(alignment="l2", lam=1.0)
    c.prepare(model, ["2"], INFO)
    w, w_hat = model[2].parametrizations.weight.original, model[2].weight
    a, b = w.reshape(16, -1), w_hat.reshape(16, -1)
    expected = ((a - b).pow(2).sum(1) / a.pow(2).sum(1)).mean()
    assert float(c.penalty().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_sr_ste_gradient():
    w = torch.randn(4, 8, requires_grad=True)
    keep = nm_mask(w, NM(2, 4))
    mask = keep.float()
    out = _SRSTE.apply(w, keep, 0.5)
    assert torch.equal(out, w * mask)
    g = torch.randn(4, 8)
    out.backward(g)
    assert torch.allclose(w.grad, g + 0.5 * (1 - mask) * w.detach())


def test_finalize_gives_exact_nm_and_levels():
    model = toy()
    c = Slope(n=2, m=4, w_bits=3, grid="symmetric", nm_order="input")
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(3)]
    driven = drive(model, c, batches, lambda m, b: m(b[0]).pow(2).mean())
    assert driven.targets == ["2"] and len(driven.step_seconds) == 3
    w = model[2].weight
    assert not hasattr(model[2], "parametrizations")
    groups = w.reshape(16, -1, 4)
    assert ((groups != 0).sum(-1) <= 2).all()
    for row in w.reshape(16, -1):
        assert len(torch.unique(row[row > 0])) <= 3
    spec = driven.finalized.specs["2"]
    assert spec.pattern == NM(2, 4) and spec.bits == 3
    assert driven.finalized.layer_extras == {}  # N:M applies to every layer
    assert (spec.grid_kind, spec.grid_range) == ("symmetric", "lsq")
    assert c.setting() == "2:4 w3 sym"


def test_layers_not_divisible_by_m_stay_dense():
    p = NMQuantWeight(torch.randn(4, 6), NM(2, 4), UniformGrid(4))
    assert p.pattern is None


@pytest.mark.parametrize("w_bits", [None, 4])
def test_layer_not_divisible_by_m_is_noted_and_trains(w_bits):
    """The layer stays dense (quantized when there is a grid), gets a ``note``, and its
    identity forward never registers a parameter (``prune`` with an odd layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    model.first_layers, model.classifier_layers = [], ["4"]
    c = Slope(n=2, m=4, w_bits=w_bits)
    batches = [(torch.randn(5, 8),) for _ in range(3)]
    driven = drive(model, c, batches, lambda m, b: m(b[0]).pow(2).mean())
    assert driven.finalized.layer_extras == {"2": {"note": "2:4 not applied: input size 6 is not divisible by m=4"}}
    assert driven.finalized.specs["2"].pattern is None
    zeros = float((model[2].weight == 0).float().mean())
    assert zeros == 0.0 if w_bits is None else zeros < 0.25  # only rounding zeros, no pruning
    assert [n for n, _ in c.layers["2"].named_parameters()] == ([] if w_bits is None else ["step"])


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(n=5, m=4), "n"),
        (dict(m=0), "m"),
        (dict(w_bits=9), "w_bits"),
        (dict(w_bits=0), "w_bits"),
        (dict(lam=-1.0), "lam"),
        (dict(alignment="angle"), "alignment"),
        (dict(grid="asymmetric"), "grid"),
        (dict(grid="unsigned"), "grid"),
        (dict(range="mse"), "range"),
        (dict(range="percentile"), "range"),
    ],
)
def test_bad_input_names_the_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        Slope(**kwargs)
    assert e.value.key == key
    assert "\n" not in e.value.line()


@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.5])
def test_fused_sr_ste_lsq_matches_the_two_step_composition(decay):
    torch.manual_seed(0)
    w0 = torch.randn(8, 32, dtype=torch.double)
    keep = nm_mask(w0, NM(2, 4))
    step0 = torch.rand(8, 1, dtype=torch.double) * 0.3 + 0.05  # small steps: some values clamp
    g = torch.randn(8, 32, dtype=torch.double)
    grads = []
    for fused in (True, False):
        w, step = w0.clone().requires_grad_(), step0.clone().requires_grad_()
        if fused:
            out = _SRSTELSQ.apply(w, keep, step, -8, 7, decay)
        else:
            out = _LSQRoundClamp.apply(_SRSTE.apply(w, keep, decay), step, -8, 7)
        out.backward(g)
        grads.append((out.detach(), w.grad, step.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)
    assert (grads[0][0][~keep] == 0).all()
    assert (grads[0][0] > 7 * step0 + 1e-9).sum() == 0 and (grads[0][0] < -8 * step0 - 1e-9).sum() == 0  # clamped
    v = w0 * keep / step0
    band = ((v > 7) & (v < 7.5)) | ((v < -8) & (v > -8.5))  # rounds to an end code, outside the clip range: no weight gradient (Eq. 3)
    assert band.any() and (grads[0][1][band & keep] == 0).all()


def test_row_cosine_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    a = torch.randn(6, 20, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, 20, dtype=torch.double, requires_grad=True)
    ref = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert torch.allclose(row_cosine(a, b), ref)
    assert torch.autograd.gradcheck(row_cosine, (a, b))
    zero = torch.zeros(2, 5, dtype=torch.double, requires_grad=True)
    out = row_cosine(zero, torch.ones(2, 5, dtype=torch.double))
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, dtype=torch.double)) and torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_default_grid_is_lsq_signed_with_channel_major_groups(bits):
    """LSQ's grid: ``2^b`` levels per channel (w2 = {−2, −1, 0, 1}·s); N:M groups along
    input channels at each spatial position (``channel_major``)."""
    model = toy()
    c = Slope(w_bits=bits)
    assert c.grid.kind == "signed" and c.range == "lsq" and c.pattern == NM(2, 4, "channel_major")
    driven = drive(model, c, [(torch.randn(4, 3, 8, 8),) for _ in range(2)], lambda m, b: m(b[0]).pow(2).mean())
    w = model[2].weight
    assert satisfies_nm(w, NM(2, 4, "channel_major"))
    for row in w.reshape(16, -1):
        assert torch.unique(row).numel() <= 2**bits
        assert torch.unique(row[row > 0]).numel() <= 2 ** (bits - 1) - 1
    spec = driven.finalized.specs["2"]
    assert (spec.grid_kind, spec.grid_range, spec.zero_points) == ("signed", "lsq", 0)
    assert c.setting() == f"2:4 w{bits}"


def test_minmax_step_init():
    w = torch.randn(16, 8, 3, 3)
    lsq = NMQuantWeight(w, NM(2, 4), UniformGrid(3), range_="lsq").step
    minmax = NMQuantWeight(w, NM(2, 4), UniformGrid(3), range_="minmax").step
    kept = w * nm_mask(w, NM(2, 4))
    torch.testing.assert_close(minmax.detach(), fp16_exact(2 * kept.reshape(16, -1).abs().amax(1, keepdim=True) / 7))
    assert not torch.allclose(lsq, minmax)
