import pytest
import torch
from torch import nn

from slope_bench.errors import ConfigError
from slope_bench.methods.slope import _SRSTE, _SRSTELSQ, NMQuantWeight, Slope, row_cosine
from slope_bench.quant import UniformGrid, _LSQRoundClamp
from slope_bench.sparsity import NM, nm_mask


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 64, 10))


def test_cosine_identity_for_magnitude_mask():
    """For a magnitude N:M mask, cos(w, m ⊙ w) = ‖m ⊙ w‖ / ‖w‖."""
    w = torch.randn(32, 64)
    mw = w * nm_mask(w, NM(2, 4))
    cos = torch.nn.functional.cosine_similarity(w, mw, dim=1)
    assert torch.allclose(cos, mw.norm(dim=1) / w.norm(dim=1), atol=1e-6)


def test_alignment_penalty_is_lambda_mean_one_minus_cos():
    model = toy()
    c = Slope(n=2, m=4, w_bits=None, lam=3.0)
    c.prepare(model, ["2"])
    w = model[2].parametrizations.weight.original
    w_hat = model[2].weight
    expected = 3.0 * (1 - torch.nn.functional.cosine_similarity(w.reshape(16, -1), w_hat.reshape(16, -1), dim=1)).mean()
    assert float(c.penalty()) == pytest.approx(float(expected), rel=1e-5)
    expected_identity = 3.0 * (1 - w_hat.reshape(16, -1).norm(dim=1) / w.reshape(16, -1).norm(dim=1)).mean()
    assert float(c.penalty()) == pytest.approx(float(expected_identity), rel=1e-4)


def test_penalty_gradient_reaches_weights_and_steps():
    model = toy()
    c = Slope(lam=1.0)
    c.prepare(model, ["2"])
    model(torch.randn(2, 3, 8, 8))
    c.penalty().backward()
    p = c.layers["2"]
    assert model[2].parametrizations.weight.original.grad.abs().sum() > 0
    assert p.step.grad is not None


def test_none_and_l2_alignments():
    model = toy()
    assert Slope(alignment="none").prepare(model, ["2"]) is model
    model = toy()
    c = Slope(alignment="l2", lam=1.0)
    c.prepare(model, ["2"])
    w, w_hat = model[2].parametrizations.weight.original, model[2].weight
    a, b = w.reshape(16, -1), w_hat.reshape(16, -1)
    expected = ((a - b).pow(2).sum(1) / a.pow(2).sum(1)).mean()
    assert float(c.penalty()) == pytest.approx(float(expected), rel=1e-5)


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
    c = Slope(n=2, m=4, w_bits=3)
    c.prepare(model, ["2"])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean() + c.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        c.on_step(step, 3)
    c.finalize(model)
    w = model[2].weight
    assert not hasattr(model[2], "parametrizations")
    groups = w.reshape(16, -1, 4)
    assert ((groups != 0).sum(-1) <= 2).all()
    for row in w.reshape(16, -1):
        assert len(torch.unique(row[row > 0])) <= 3
    assert c.specs["2"].pattern == NM(2, 4) and c.specs["2"].bits == 3
    assert c.setting() == "2:4 w3"


def test_layers_not_divisible_by_m_stay_dense():
    p = NMQuantWeight(torch.randn(4, 6), NM(2, 4), UniformGrid(4))
    assert p.pattern is None


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(n=5, m=4), "n"),
        (dict(m=0), "m"),
        (dict(w_bits=9), "w_bits"),
        (dict(w_bits=0), "w_bits"),
        (dict(lam=-1.0), "lam"),
        (dict(alignment="angle"), "alignment"),
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
            out = _SRSTELSQ.apply(w, keep, step, -7, 7, decay)
        else:
            out = _LSQRoundClamp.apply(_SRSTE.apply(w, keep, decay), step, -7, 7)
        out.backward(g)
        grads.append((out.detach(), w.grad, step.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)
    assert (grads[0][0][~keep] == 0).all()
    assert (grads[0][0].abs() > 7 * step0 + 1e-9).sum() == 0  # clamped at the top level


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
