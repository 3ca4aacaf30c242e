"""Calibration Hessians (H = 2XXᵀ, unfolded convs) and BatchNorm re-estimation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slope_bench.calibration import (
    collect_hessians,
    collect_layer_statistics,
    forward_call_counts,
    layer_input_matrix,
    layer_inputs_hessian,
    recalibrate_batchnorm,
)


def _linear_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def test_linear_hessian_matches_hand_computation() -> None:
    model = _linear_model()
    batches = [torch.randn(6, 5), torch.randn(3, 5)]
    hessians = collect_hessians(model, ["0", "2"], batches)
    x = torch.cat(batches).double()
    assert hessians["0"].dtype == torch.float64
    torch.testing.assert_close(hessians["0"], 2 * x.T @ x)
    hidden = torch.relu(x @ model[0].weight.double().T + model[0].bias.double())
    torch.testing.assert_close(hessians["2"], 2 * hidden.T @ hidden, rtol=1e-5, atol=1e-6)


def test_linear_hessian_flattens_token_dimensions() -> None:
    layer = nn.Linear(4, 2)
    x = torch.randn(2, 3, 4)
    flat = x.reshape(6, 4).double()
    torch.testing.assert_close(layer_inputs_hessian(layer, x), 2 * flat.T @ flat)


def _patches_by_hand(x: torch.Tensor, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Rows ``(C·kh·kw)`` of every output position, gathered with explicit loops."""
    x = F.pad(x, (padding,) * 4)
    batch, _, height, width = x.shape
    span = dilation * (kernel - 1) + 1
    rows = []
    for b in range(batch):
        for i in range(0, height - span + 1, stride):
            for j in range(0, width - span + 1, stride):
                patch = x[b, :, i : i + span : dilation, j : j + span : dilation]
                rows.append(patch.reshape(-1))
    return torch.stack(rows).double()


def test_conv_hessian_matches_hand_unfolded_patches() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, dilation=2)
    model = nn.Sequential(conv)
    batches = [torch.randn(2, 2, 7, 6), torch.randn(1, 2, 7, 6)]
    patches = torch.cat([_patches_by_hand(b, 3, 2, 1, 2) for b in batches])
    hessian = collect_hessians(model, ["0"], batches)["0"]
    torch.testing.assert_close(hessian, 2 * patches.T @ patches)
    # the rows are ordered like weight.reshape(out, -1): W·x reproduces the convolution
    out = conv(batches[0]) - conv.bias[None, :, None, None]
    rows = layer_input_matrix(conv, batches[0])
    by_rows = rows @ conv.weight.detach().reshape(3, -1).double().T
    torch.testing.assert_close(by_rows, out.permute(0, 2, 3, 1).reshape(-1, 3).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"padding": "same", "dilation": 1},
        {"padding": 2, "padding_mode": "reflect", "stride": 2},
        {"padding": "valid", "stride": (1, 2)},
    ],
)
def test_conv_hessian_quadratic_form_equals_output_energy(options: dict) -> None:
    """``½ tr(W H Wᵀ) = ‖conv(x, W)‖²`` for any weight W (Hessian of the reconstruction)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, kernel_size=3, bias=False, **options)
    x = torch.randn(2, 3, 9, 8)
    hessian = layer_inputs_hessian(conv, x)
    weight = conv.weight.detach().reshape(4, -1).double()
    energy = conv(x).double().square().sum()
    torch.testing.assert_close(0.5 * ((weight @ hessian) * weight).sum(), energy, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_raise() -> None:
    with pytest.raises(ValueError, match="groups"):
        layer_inputs_hessian(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match="Linear and nn.Conv2d"):
        layer_inputs_hessian(nn.Conv1d(2, 2, 3), torch.randn(1, 2, 5))


class _Branchy(nn.Module):
    """Calls ``shared`` twice per forward and never calls ``unused``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.shared = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(self.first(x)))


def test_call_counts_order_and_unreached_layers() -> None:
    model = _Branchy()
    order, counts = forward_call_counts(model, ["unused", "shared", "first"], torch.randn(2, 3))
    assert order == ["first", "shared", "unused"]
    assert counts == {"unused": 0, "shared": 2, "first": 1}
    stats = collect_layer_statistics(model, ["shared", "unused"], [torch.randn(4, 3)])
    assert stats["shared"].rows == 8 and stats["shared"].calls == 2
    assert stats["unused"].hessian is None and stats["unused"].rows == 0
    zeros = collect_hessians(model, ["unused"], [torch.randn(4, 3)])["unused"]
    assert zeros.shape == (3, 3) and not zeros.any()


def test_stop_early_gives_the_same_hessian_and_restores_mode() -> None:
    model = _linear_model().train()
    batches = [torch.randn(4, 5) for _ in range(3)]
    full = collect_layer_statistics(model, ["0"], batches)["0"]
    early = collect_layer_statistics(model, ["0"], batches, stop_early=True)["0"]
    torch.testing.assert_close(early.hessian, full.hessian)
    assert early.rows == full.rows == 12
    assert model.training


def test_batchnorm_recalibration_matches_calibration_statistics() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    norm = nn.BatchNorm2d(3, momentum=0.3)
    model = nn.Sequential(conv, norm, nn.ReLU(), nn.Dropout(0.5))
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(7.0)
    batches = [torch.randn(4, 2, 5, 5) + 1.0 for _ in range(3)]
    count = recalibrate_batchnorm(model, batches)
    assert count == 1
    with torch.no_grad():
        outputs = [conv(b) for b in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outputs])
    variances = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outputs])
    # momentum=None: cumulative average of the per-batch statistics
    torch.testing.assert_close(norm.running_mean, means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, variances.mean(0), rtol=1e-5, atol=1e-5)
    overall = torch.cat(outputs).mean((0, 2, 3))
    torch.testing.assert_close(norm.running_mean, overall, rtol=1e-5, atol=1e-5)
    assert norm.momentum == 0.3
    assert int(norm.num_batches_tracked) == 3
    assert not model.training and not norm.training


def test_batchnorm_recalibration_without_batchnorm_is_a_no_op() -> None:
    model = _linear_model()
    before = [p.clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, [torch.randn(2, 5)]) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
