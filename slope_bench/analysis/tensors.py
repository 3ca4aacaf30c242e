"""Tensor-level paper checks: pruning vs quantization (Kuzmin et al.), the order of sparsity
and quantization (Harma et al.) and CoDeQ's dead zone. Every number comes from the
project's own operators (:mod:`slope_bench.quant`, :mod:`slope_bench.sparsity`,
:mod:`slope_bench.deadzone`); nothing here rounds a weight itself."""

from __future__ import annotations

import math

import numpy as np
import torch

from slope_bench.deadzone import dead_zone_apply, dead_zone_grid, dead_zone_harden, dead_zone_width, percentile_abs
from slope_bench.quant import UniformGrid, fake_quantize, fit_grid, group_rows, harden, rtn_step, sqnr_db
from slope_bench.sparsity import NM, magnitude_mask, nm_mask

# Kuzmin et al.: per-tensor symmetric uniform grid (the paper's INT-b), range by an MSE search
KUZMIN_GRID = "signed"
# truncated Student-t (degrees of freedom, truncation |t| <= bound): kurtosis from ≈3.3 to ≈170
STUDENT_T = ((30.0, 10.0), (10.0, 10.0), (5.0, 10.0), (4.0, 20.0), (3.0, 30.0), (2.0, 30.0), (2.0, 100.0))


def kurtosis(w: torch.Tensor) -> float:
    """Sample kurtosis ``E[(w − μ)⁴] / E[(w − μ)²]²`` (3 for a Gaussian)."""
    x = w.double().flatten()
    x = x - x.mean()
    return float(x.pow(4).mean() / x.pow(2).mean().pow(2))


def truncated_student_t(df: float, bound: float, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` samples (float32) of a Student-t with ``df`` degrees of freedom truncated at ``±bound``, unit variance."""
    t = rng.standard_t(df, size=2 * n)
    t = t[np.abs(t) <= bound][:n]
    out = torch.from_numpy(t).float()
    return out / out.std()


def mse_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric quantization, range by the project's MSE clipping search
    (:func:`slope_bench.quant.fit_grid` with ``range_="mse"``), hardened by :func:`harden`."""
    grid = UniformGrid(bits, KUZMIN_GRID, "tensor")
    scale, _ = fit_grid(group_rows(w.detach(), "tensor"), grid, "mse")
    return harden(w, scale, grid)


def prune_tensor(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-tensor magnitude pruning (:func:`slope_bench.sparsity.magnitude_mask`)."""
    return w * magnitude_mask(w, sparsity)


def equal_compression(w: torch.Tensor, bits: int) -> tuple[float, float, float]:
    """``(sparsity, SQNR quantized, SQNR pruned)`` at equal compression against fp16."""
    sparsity = 1 - bits / 16
    return sparsity, sqnr_db(w, mse_quantize(w, bits)), sqnr_db(w, prune_tensor(w, sparsity))


def prune_vs_quant_rows(bits: list[int], samples: int, seed: int = 0) -> list[dict]:
    """One row per distribution (Gaussian, truncated Student-t per ``df``) and bit width."""
    rng = np.random.default_rng(seed)
    dists = [("gaussian", torch.from_numpy(rng.standard_normal(samples)).float())]
    dists += [(f"student_t(df={df:g},|t|<={b:g})", truncated_student_t(df, b, samples, rng)) for df, b in STUDENT_T]
    rows = []
    for name, w in dists:
        k = kurtosis(w)
        for b in bits:
            s, q, p = equal_compression(w, b)
            rows.append({"distribution": name, "kurtosis": k, "bits": b, "sparsity": s, "sqnr_quant_db": q, "sqnr_prune_db": p})
    return rows


def crossover_kurtosis(rows: list[dict], bits: int) -> float:
    """Smallest kurtosis among the synthetic distributions where pruning wins at ``bits`` (inf: none)."""
    wins = [r["kurtosis"] for r in rows if r["bits"] == bits and r["sqnr_prune_db"] > r["sqnr_quant_db"]]
    return min(wins, default=math.inf)


# ---- order (Harma et al.) -----------------------------------------------------------------
def absmax_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Max-scaled (absmax) per-output-channel symmetric quantization: :func:`rtn_step` + :func:`harden`."""
    grid = UniformGrid(bits, "symmetric", "channel")
    return harden(w, rtn_step(w, grid), grid)


def order_errors(w: torch.Tensor, pattern: NM, bits: int) -> dict[str, float]:
    """Relative Frobenius errors ``ε(f) = ‖W − f(W)‖_F / ‖W‖_F`` of S, Q, Q∘S (prune, then
    quantize with the scale of the pruned tensor) and S∘Q (quantize, then the N:M mask of
    the quantized tensor)."""
    norm = float(w.double().norm())

    def eps(x: torch.Tensor) -> float:
        return float((w.double() - x.double()).norm()) / norm

    pruned = w * nm_mask(w, pattern)
    quantized = absmax_quantize(w, bits)
    q_of_s = absmax_quantize(pruned, bits)
    s_of_q = quantized * nm_mask(quantized, pattern)
    e_s, e_q = eps(pruned), eps(quantized)
    return {"eps_S": e_s, "eps_Q": e_q, "eps_QS": eps(q_of_s), "eps_SQ": eps(s_of_q), "eps_S_plus_Q": e_s + e_q}


def order_rows(layers: dict[str, torch.Tensor], bits: list[int]) -> list[dict]:
    """One row per layer, pattern (2:4, 1:4) and bit width; layers whose input is not a multiple of 4 are skipped."""
    rows = []
    for name, w in layers.items():
        for pattern in (NM(2, 4), NM(1, 4)):
            if not pattern.applies_to(w):
                continue
            for b in bits:
                e = order_errors(w.detach().float(), pattern, b)
                bound = e["eps_S_plus_Q"] * (1 + 1e-9)
                rows.append(
                    {
                        "layer": name,
                        "pattern": str(pattern),
                        "bits": b,
                        **e,
                        "QS_exceeds_sum": e["eps_QS"] > bound,
                        "SQ_exceeds_sum": e["eps_SQ"] > bound,
                        "QS_worse_than_SQ": e["eps_QS"] > e["eps_SQ"] * (1 + 1e-9),
                    }
                )
    return rows


# ---- CoDeQ dead zone ----------------------------------------------------------------------
def deadzone_identity(w: torch.Tensor, bits: int) -> dict:
    """Dead-zone width = step: the dead-zone quantizer against the ordinary symmetric one
    (per tensor, step ``a / Q``, ``a`` the 99th percentile of ``|w|``), hardened and in the
    training forward; ``equal`` means bit for bit (``torch.equal``)."""
    a = percentile_abs(w, 99.0)
    qmax = 2 ** (bits - 1) - 1
    step = a / qmax
    hard, step16, offset16 = dead_zone_harden(w, a, step, bits)
    grid = UniformGrid(bits, "symmetric", "tensor")
    plain = harden(w, step.reshape(1, 1), grid)
    s, delta, q = dead_zone_grid(a, step, bits)
    soft = dead_zone_apply(w, s, delta, q)
    plain_soft = fake_quantize(w, s.reshape(1, 1), grid)
    return {
        "bits": bits,
        "hardened_equal": bool(torch.equal(hard, plain)),
        "forward_equal": bool(torch.equal(soft, plain_soft)),
        "forward_max_abs_diff": float((soft - plain_soft).abs().max()),
        "offset16": float(offset16),
    }


def deadzone_sparsity_rows(samples: int, bits: int = 4, seed: int = 0, points: int = 21) -> list[dict]:
    """Measured sparsity of :func:`dead_zone_harden` on a standard Gaussian as ``θ_d`` sweeps,
    against ``P(|w| < d/2) = erf(d / (2√2))`` and a 4-sigma binomial tolerance."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(samples, generator=g)
    a = percentile_abs(w, 99.0)
    rows = []
    for theta in torch.linspace(0.05, 3.0, points):
        d = dead_zone_width(theta, a)
        hard, _, _ = dead_zone_harden(w, a, d, bits)
        measured = float((hard == 0).double().mean())
        predicted = math.erf(float(d) / 2 / math.sqrt(2))
        tol = 4 * math.sqrt(max(predicted * (1 - predicted), 1 / samples) / samples)
        rows.append(
            {"theta_d": float(theta), "width": float(d), "sparsity_measured": measured, "sparsity_predicted": predicted, "tolerance": tol}
        )
    return rows
