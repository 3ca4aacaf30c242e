"""OBC — Optimal Brain Compression (Frantar, Singh, Alistarh; NeurIPS 2022), post-training.

Each targeted layer is compressed on its own so that its output on calibration data
changes as little as possible: minimise ``‖WX − ŴX‖²`` subject to the sparsity pattern
and the quantization grid, with ``H = 2XXᵀ`` collected by :mod:`slope_bench.calibration`.
The solvers (ExactOBS pruning, OBQ quantization, the GPTQ/SparseGPT blocked sweeps and
the magnitude + round-to-nearest baseline) are pure functions in :mod:`slope_bench.obs`;
this module is the method: which layers, in which order, on which Hessian, and what is
reported.

The method declares itself post-training (:attr:`OBC.requirements`: no fine-tune,
``n_calib`` calibration samples passed ``calib_passes`` times). Grouped and depthwise
convolutions are not supported (their Hessian is per group, ``supports`` says why) and
stay dense; a layer whose input size is not divisible by ``m`` is quantized but not
pruned, with a ``note`` in its ``layer_extras``.

Choices (knobs; paper = Frantar et al. 2022 and its reference code IST-DASLab/OBC):

* the grid: ``grid=signed`` with ``range=mse`` is the reference quantizer's default
  (``sym=True``: ``2^b`` codes with the zero point at the middle, per channel; an
  ``|q(w) − w|^2.4`` clipping search over 80 shrink factors 1.00 … 0.21 of the range),
  :func:`slope_bench.quant.fit_grid`; ``symmetric``, ``asymmetric`` (GPTQ/SparseGPT) and
  ``range=minmax`` are knobs;
* OBQ's outlier rule (OBC §5, ``outlier_rule``, on as in the paper): an open weight
  outside the grid's range is quantized first (:func:`slope_bench.obs.exact_obq`);
* the solver per layer (``solver=auto``): the paper's exact solver when its estimated
  time (:func:`slope_bench.obs.estimate_exact_seconds`, measured rates of this device)
  fits ``exact_budget_s``, else the blocked GPTQ/SparseGPT sweep; ``exact_budget_s=auto``
  is unlimited on a GPU (the paper ran ExactOBS on whole ResNets) and 2 s per layer on a
  CPU. The blocked joint solve prunes and quantizes in ``one_sweep`` (SparseGPT) by
  default, ``two_pass`` for the ablation; the exact one is OBC's prune-then-OBQ. Each
  layer records ``solver``, ``joint``, ``solve_s`` and ``exact_est_s``;
* sequential calibration by re-running the calibration batches through the partly
  compressed model for every layer, stopping each forward pass as soon as the layer has
  been reached (when every targeted layer runs once per forward). After solving,
  BatchNorm statistics are re-estimated on the calibration data (``bn_recalib``).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from slope_bench.calibration import collect_layer_statistics, forward_call_counts, recalibrate_batchnorm
from slope_bench.errors import ConfigError, check_bool, check_choice, check_int, check_range
from slope_bench.methods.base import FLOAT_SPEC, Compressor, Finalized, LayerSpec, NMBits, Requirements, nm_reason
from slope_bench.obs import JOINTS, RowQuantizer, column_permutation, estimate_exact_seconds, solve_layer, torch_threads
from slope_bench.quant import RANGES
from slope_bench.sparsity import NM, Unstructured, as_matrix, from_matrix

SOLVERS = ("auto", "exact", "blocked", "magnitude")
CPU_EXACT_BUDGET_S = 2.0  # exact_budget_s=auto on a CPU: seconds per layer


class OBC(Compressor):
    """Optimal Brain Compression: post-training layer-wise N:M / unstructured + k-bit.

    Args:
        name: the method's name in ``results.json``.
        n, m: N:M pattern (both ``None``: no N:M).
        sparsity: unstructured target in ``[0, 1)`` (only when ``n``/``m`` are ``None``).
        w_bits: weight bits 1..8 (``None``: full precision).
        grid: ``signed`` (the reference code's grid), ``symmetric`` or ``asymmetric``.
        range: ``mse`` (the reference clipping search) or ``minmax``.
        n_calib: calibration samples ``finalize`` needs (declared in :attr:`requirements`).
        calib_passes: passes over the calibration samples (declared in
            :attr:`requirements`; the run hands ``finalize`` the batches that many times).
            Only useful when the batches are random views; with fixed eval views it only
            rescales ``H``.
        damp: damping as a fraction of the mean Hessian diagonal (> 0).
        solver: ``auto`` (exact within ``exact_budget_s``, blocked otherwise), ``exact``,
            ``blocked`` or ``magnitude`` (magnitude + round-to-nearest, no Hessian).
        exact_budget_s: per-layer time budget of the exact solver under ``auto``: a
            number of seconds, ``null`` (unlimited) or ``auto`` (unlimited on a GPU,
            ``CPU_EXACT_BUDGET_S`` on a CPU).
        joint: blocked prune + quantize in ``one_sweep`` (SparseGPT) or ``two_pass``.
        outlier_rule: OBQ's outlier rule (exact solver).
        block_size: lazy-update block of the blocked solver.
        sequential: each layer sees the already-compressed layers before it (default);
            ``False``: every Hessian comes from the dense model.
        bn_recalib: re-estimate BatchNorm statistics on the calibration data afterwards.
        nm_order: N:M groups along input channels at each spatial position
            (``channel_major``, default) or along the flattened ``in × kh × kw`` (``input``).
        solve_threads: CPU threads while solving a layer (``None``: torch's setting). The
            solvers issue thousands of small kernels; on a shared 2-core CPU one thread
            was 10-15× faster than two (OpenMP synchronisation dominates). No effect on GPU.
        progress: show a progress bar over layers.
        compress_first, compress_classifier: see :class:`Compressor`.

    Attributes:
        quantizers: the per-row grid fitted for every layer by the last ``finalize``
            (for inspection; not checkpoint state).
    """

    def __init__(
        self,
        name: str = "obc",
        n: int | None = 2,
        m: int | None = 4,
        sparsity: float | None = None,
        w_bits: int | None = 4,
        grid: str = "signed",
        range: str = "mse",
        n_calib: int = 1024,
        calib_passes: int = 1,
        damp: float = 0.01,
        solver: str = "auto",
        exact_budget_s: float | str | None = "auto",
        joint: str = "one_sweep",
        outlier_rule: bool = True,
        block_size: int = 128,
        sequential: bool = True,
        bn_recalib: bool = True,
        nm_order: str = "channel_major",
        solve_threads: int | None = 1,
        progress: bool = True,
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(name, compress_first, compress_classifier)
        knobs = NMBits(n=n, m=m, w_bits=w_bits, nm_order=nm_order, grid_kind=grid)
        self.pattern, self.grid = knobs.pattern, knobs.grid
        if sparsity is not None:
            if self.pattern is not None:
                raise ConfigError("sparsity", sparsity, "null when n and m are set")
            sparsity = check_range("sparsity", sparsity, 0.0, 1.0, high_open=True)
        self.sparsity = sparsity
        self.range = check_choice("range", range, RANGES)
        if isinstance(exact_budget_s, str) and exact_budget_s != "auto":
            raise ConfigError("exact_budget_s", exact_budget_s, "seconds per layer (a number >= 0), null (unlimited) or auto")
        self.exact_budget_s = exact_budget_s if exact_budget_s in ("auto", None) else check_range("exact_budget_s", exact_budget_s, 0.0)
        self.joint = check_choice("joint", joint, JOINTS)
        self.outlier_rule = check_bool("outlier_rule", outlier_rule)
        self.n_calib = check_int("n_calib", n_calib, 1)
        self.calib_passes = check_int("calib_passes", calib_passes, 1)
        self.damp = check_range("damp", damp, 0.0, 1e6, low_open=True)
        self.solver = check_choice("solver", solver, SOLVERS)
        self.block_size = check_int("block_size", block_size, 1)
        self.sequential = check_bool("sequential", sequential)
        self.bn_recalib = check_bool("bn_recalib", bn_recalib)
        self.solve_threads = None if solve_threads is None else check_int("solve_threads", solve_threads, 1)
        self.progress = check_bool("progress", progress)
        self.quantizers: dict[str, RowQuantizer] = {}

    # ---- declared ---------------------------------------------------------------------------
    @property
    def requirements(self) -> Requirements:
        """Post-training: no fine-tune; ``n_calib`` calibration samples, ``calib_passes`` passes."""
        return Requirements(trains=False, calib_samples=self.n_calib, calib_passes=self.calib_passes)

    def supports(self, name: str, module: nn.Module) -> str | None:
        """Conv2d/Linear layers without groups: the layer Hessian of a grouped (or
        depthwise) convolution is one per group, which the solvers do not model."""
        reason = super().supports(name, module)
        if reason is None and isinstance(module, nn.Conv2d) and module.groups != 1:
            reason = f"OBC does not support grouped convolutions (groups={module.groups}): kept dense"
        return reason

    # ---- one layer --------------------------------------------------------------------------
    def budget(self, device: torch.device) -> float | None:
        """The exact solver's per-layer budget in seconds on ``device`` (``None``: unlimited)."""
        if self.exact_budget_s == "auto":
            return None if device.type == "cuda" else CPU_EXACT_BUDGET_S
        return self.exact_budget_s

    def layer_solver(self, rows: int, d_col: int, pattern: NM | None, device: torch.device) -> tuple[str, float | None]:
        """``(solver, estimated exact seconds)`` for a ``rows × d_col`` layer (the estimate
        is ``None`` when no budget asked for one)."""
        if self.solver != "auto":
            return self.solver, None
        budget = self.budget(device)
        if budget is None:
            return "exact", None
        estimate = estimate_exact_seconds(rows, d_col, pattern, self.sparsity, self.grid, device)
        return ("exact" if estimate <= budget else "blocked"), estimate

    def layer_pattern(self, weight: torch.Tensor) -> NM | None:
        """The N:M pattern if it applies to this weight (input size divisible by ``m``)."""
        return self.pattern if self.pattern is not None and self.pattern.applies_to(weight) else None

    @torch.no_grad()
    def compress_layer(self, name: str, module: nn.Module, hessian: torch.Tensor) -> tuple[LayerSpec, dict]:
        """Solve one layer against ``hessian`` and write the result into ``module.weight``.

        Returns:
            ``(spec, extras)``: the layer's declared encoding and its ``layers`` extras
            (``recon_error``, ``solver``, ``solve_s`` and a ``note`` when N:M does not apply).
        """
        weight = module.weight.detach()
        pattern = self.layer_pattern(weight)
        order = self.pattern.order if self.pattern is not None else "input"
        matrix = as_matrix(weight, order)
        if order != "input" and weight.dim() > 2:
            perm = column_permutation(weight.shape, order, hessian.device)
            hessian = hessian[perm][:, perm]
        threads = self.solve_threads if weight.device.type == "cpu" else None
        with torch_threads(threads):
            solver, estimate = self.layer_solver(*matrix.shape, pattern, weight.device)
            start = time.perf_counter()
            solution = solve_layer(
                matrix, hessian, pattern, self.sparsity, self.grid, self.damp, solver, self.block_size,
                self.range, self.joint, self.outlier_rule,
            )  # fmt: skip
            elapsed = time.perf_counter() - start
        if solution.quantizer is not None:
            self.quantizers[name] = solution.quantizer
        module.weight.data.copy_(from_matrix(solution.weight, weight.shape, order).to(weight.dtype))
        extras = {"recon_error": solution.recon_error, **solution.extras, "solve_s": elapsed, "exact_est_s": estimate}
        note = nm_reason(self.pattern, module)
        if note is not None:
            extras["note"] = note
        if pattern is not None:
            layer_pattern = pattern
        elif self.pattern is None and self.sparsity:
            layer_pattern = Unstructured()
        else:
            layer_pattern = None
        if self.grid is None:
            return LayerSpec(pattern=layer_pattern, grid="float", bits=None), extras
        zeros = matrix.shape[0] if self.grid.zero_point else 0
        spec = LayerSpec(
            layer_pattern, "uniform", self.grid.bits, "channel", matrix.shape[0] + zeros,
            grid_kind=self.grid.kind, grid_range=self.range, zero_points=zeros,
        )  # fmt: skip
        return spec, extras

    # ---- the hook -----------------------------------------------------------------------------
    def finalize(self, model: nn.Module, calib_batches: list | None = None) -> Finalized:
        """Solve every targeted layer on ``calib_batches``, then re-estimate BatchNorm.

        Args:
            model: the model returned by ``prepare`` (targets recorded, no parametrization).
            calib_batches: list of model inputs (``n_calib`` training samples in total).

        Returns:
            The layer specs, per-layer extras (``recon_error``, ``solver``, ``solve_s``,
            ``calib_rows``) and ``time/obc_*`` / ``obc/recon_error_mean`` results. The
            targeted weights are sparse and on their grids; the model is in eval mode
            when ``bn_recalib`` is on.

        Raises:
            ValueError: when there is something to solve and no calibration batch.
        """
        if self.pattern is None and not self.sparsity and self.grid is None:
            return Finalized(specs=dict.fromkeys(self.modules, FLOAT_SPEC))
        batches = list(calib_batches or [])
        if not batches:
            raise ValueError("OBC needs calibration batches: finalize(model, calib_batches) got none")
        names = list(self.modules)
        order, counts = forward_call_counts(model, names, batches[0])
        dense_stats = None if self.sequential else collect_layer_statistics(model, names, batches)
        specs: dict[str, LayerSpec] = {}
        extras: dict[str, dict] = {}
        results: dict[str, float] = {}
        calib_s = 0.0
        total_start = time.perf_counter()
        for name in tqdm(order, desc="obc", unit="layer", disable=not self.progress):
            module = self.modules[name]
            start = time.perf_counter()
            if dense_stats is not None:
                stat = dense_stats.pop(name)
            else:
                stat = collect_layer_statistics(model, [name], batches, stop_early=counts[name] == 1)[name]
            calib_s += time.perf_counter() - start
            hessian = stat.hessian
            if hessian is None:  # layer never reached by the calibration data: magnitude-like
                d_col = module.weight[0].numel()
                hessian = torch.eye(d_col, dtype=torch.float64, device=module.weight.device)
            specs[name], extras[name] = self.compress_layer(name, module, hessian)
            extras[name]["calib_rows"] = stat.rows
            key = f"time/obc_solve_{extras[name]['solver']}_s"
            results[key] = results.get(key, 0.0) + extras[name]["solve_s"]
            del stat, hessian
        results["time/obc_total_s"] = time.perf_counter() - total_start
        results["time/obc_calib_s"] = calib_s
        if extras:
            errors = [extra["recon_error"] for extra in extras.values()]
            results["obc/recon_error_mean"] = sum(errors) / len(errors)
        if self.bn_recalib:
            start = time.perf_counter()
            recalibrate_batchnorm(model, batches)
            results["time/obc_bn_recalib_s"] = time.perf_counter() - start
        return Finalized(specs=specs, layer_extras=extras, results=results)

    def setting(self) -> str:
        parts = []
        if self.pattern is not None:
            parts.append(str(self.pattern))
        elif self.sparsity:
            parts.append(f"{round(100 * self.sparsity)}%")
        parts.append(str(self.grid) if self.grid is not None else "fp32")
        return " ".join(parts)
