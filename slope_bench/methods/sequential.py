"""Sequential baselines: prune → quantize and quantize → prune within one training budget.

One composite compressor, :class:`Sequential`, runs a list of two *stages* over the
run's shared fine-tuning budget (same total steps and LR schedule as ``slope``/``naive``):

* ``prune`` — N:M with SR-STE (Zhou et al. 2021): the mask is recomputed from the
  magnitudes at every forward; when it follows ``quantize`` the magnitudes are those of
  the quantized weights ``|Q(W)|`` (the Q→S order Harma et al. 2024 warn about; ties
  between equal codes are broken by position, the full-precision values play no part).
  When the stage ends the mask is frozen.
* ``quantize`` — per-channel LSQ (Esser et al. 2020) on LSQ's signed grid (``grid``,
  ``range`` as in :class:`~slope_bench.methods.slope.Slope`). When the stage begins the
  step is re-initialised (``range=lsq``: ``2·mean|w| / sqrt(Qp)``, §2.2 of LSQ) over the
  weights kept at that moment; when it ends the step is held (no gradient) for the rest
  of the run, so the grid stays fixed while the mask is learned.

``stages: [prune, quantize]`` is the ``prune_then_quantize`` baseline (SR-STE fine-tune,
freeze the mask, LSQ fine-tune with the mask held); ``stages: [quantize, prune]`` is
``quantize_then_prune`` (LSQ fine-tune, then N:M chosen on ``|Q(W)|`` and fine-tuned with
the grid held). The switch happens after the optimizer step for which
``step + 1 >= switch_at · total``. ``finalize`` runs any stage the training did not
reach (a run with zero steps gets both compressions, in order), so the finalized
weights are always N:M sparse and on the grid.

Every stage acts on one :class:`StagedWeight` per layer — an
:class:`~slope_bench.methods.slope.NMQuantWeight` built with both its pattern and its
grid, whose parts are switched on by the stages. A layer whose input size is not
divisible by ``m`` is quantized but not pruned (a ``note`` in its ``layer_extras``).

Checkpointable state (:meth:`Sequential.state_dict`): the stage, the switch step and the
step budget; loading stage 1 redoes the switch's structural changes (frozen mask buffers,
enabled pattern/grid, held step without gradient) so the model's state dict loads strictly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slope_bench.errors import ConfigError, check_range
from slope_bench.methods.base import CompressedWeight, Compressor, Finalized, NMBits, RunInfo, nm_notes, original_weight
from slope_bench.methods.slope import NMQuantWeight, check_lsq_grid
from slope_bench.quant import UniformGrid, grouped, init_step
from slope_bench.sparsity import NM, as_matrix

STAGE_NAMES = ("prune", "quantize")


class StagedWeight(NMQuantWeight):
    """An :class:`NMQuantWeight` whose pattern and grid start switched off.

    The pattern and grid it will use are kept in ``target_pattern`` / ``target_grid``;
    ``pattern`` / ``grid`` (what the forward reads) are ``None`` until a stage enables
    them.

    Args:
        weight: the layer's initial weight.
        pattern: N:M pattern the layer ends with (``None`` when it does not apply).
        grid: uniform grid the layer ends with.
        sr_ste_decay: ``λ_w`` of SR-STE.
        range_: step init, ``lsq`` or ``minmax``.
    """

    def __init__(
        self, weight: torch.Tensor, pattern: NM | None, grid: UniformGrid, sr_ste_decay: float = 2e-4, range_: str = "lsq"
    ) -> None:
        super().__init__(weight, pattern, grid, sr_ste_decay, range_)
        self.target_pattern = self.pattern
        self.target_grid = grid
        self.pattern = None
        self.grid = None
        self.grid_held = False

    def enable_pattern(self) -> None:
        """Switch the N:M mask on; it is chosen on ``|Q(W)|`` when the grid is already on."""
        self.pattern = self.target_pattern
        self.mask_source = "quantized" if self.grid is not None else "weight"

    @torch.no_grad()
    def enable_grid(self, weight: torch.Tensor) -> None:
        """Switch the grid on and re-initialise the LSQ step over the currently kept weights."""
        self.grid = self.target_grid
        mask = self.mask(weight)
        self.step.copy_(init_step(weight, self.grid, self.range, mask))
        self.step.requires_grad_(True)
        self.grid_held = False
        kept = float(mask.sum()) if mask is not None else weight.numel()
        self.step_grad_scale = 1.0 / math.sqrt(max(kept, 1.0) * self.grid.qmax)

    def hold_grid(self) -> None:
        """Freeze the LSQ step: no gradient reaches it from now on, so no optimizer moves it."""
        self.step.requires_grad_(False)
        self.step.grad = None
        self.grid_held = True


def compressed_levels(weight_hat: torch.Tensor, layer: StagedWeight) -> int:
    """Most distinct values (zero included) in one quantization group of ``weight_hat``.

    On the grid the values are ``code · step``, so distinct codes are counted with one
    ``scatter``; in full precision each output channel is sorted.
    """
    if layer.grid is not None:
        grid = layer.grid
        codes = torch.round(grouped(weight_hat.detach(), grid) / layer.step.detach()).long()
        codes = codes.clamp(grid.qmin, grid.qmax) - grid.qmin
        width = int(codes.max()) + 1 if codes.numel() else 1
        present = torch.zeros(codes.shape[0], width, dtype=torch.bool, device=codes.device).scatter_(1, codes, True)
        return int(present.sum(1).max())
    rows = as_matrix(weight_hat.detach()).sort(dim=1).values
    changes = (rows[:, 1:] != rows[:, :-1]).sum(1) + 1
    return int(changes.max())


class Sequential(Compressor):
    """Two compression stages one after the other within one training budget.

    Args:
        name: the method's name in ``results.json`` (``None``: ``<first>_then_<second>``).
        stages: order of the stages, two distinct names from ``prune``, ``quantize``.
        n, m: N:M pattern.
        w_bits: weight bits 1..8.
        switch_at: fraction of the training steps given to the first stage, in (0, 1).
        sr_ste_decay: SR-STE ``λ_w``.
        granularity: quantization scale granularity (``channel``/``tensor``/``group``).
        group_size: group length for ``granularity=group``.
        nm_order: ``channel_major`` (input channels at each spatial position) or ``input``.
        grid: ``signed`` (LSQ's grid) or ``symmetric``.
        range: step init, ``lsq`` (LSQ's rule) or ``minmax``.
        compress_first, compress_classifier: see :class:`Compressor`.

    Example: ``Sequential(stages=["quantize", "prune"], n=2, m=4, w_bits=4)`` is the
    ``quantize_then_prune`` baseline at 2:4 w4.
    """

    optim_groups = {"step": {"weight_decay": 0.0}}

    def __init__(
        self,
        name: str | None = None,
        stages: Sequence[str] = ("prune", "quantize"),
        n: int = 2,
        m: int = 4,
        w_bits: int = 4,
        switch_at: float = 0.5,
        sr_ste_decay: float = 2e-4,
        granularity: str = "channel",
        group_size: int = 128,
        nm_order: str = "channel_major",
        grid: str = "signed",
        range: str = "lsq",
        compress_first: bool = False,
        compress_classifier: bool = False,
    ) -> None:
        stages = check_stages(stages)
        super().__init__("_then_".join(stages) if name is None else name, compress_first, compress_classifier)
        self.stages = stages
        if n is None:
            raise ConfigError("n", n, "an integer in 1..m (both stages need an N:M pattern)")
        if w_bits is None:
            raise ConfigError("w_bits", w_bits, "an integer in 1..8 (the quantize stage needs a grid)")
        check_lsq_grid(grid, range)
        knobs = NMBits(n, m, w_bits, granularity, group_size, nm_order, grid)
        self.pattern, self.grid, self.range = knobs.pattern, knobs.grid, range
        self.switch_at = check_range("switch_at", switch_at, 0.0, 1.0, low_open=True, high_open=True)
        self.sr_ste_decay = check_range("sr_ste_decay", sr_ste_decay, 0.0, high=1e12)
        self.stage = 0
        self.switch_step: int | None = None
        self.total_steps = 0
        self.levels_every = 50
        self._stats_calls = 0
        self._levels: tuple[int, int] | None = None

    # ---- hooks --------------------------------------------------------------------------
    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        return StagedWeight(weight, self.pattern, self.grid, self.sr_ste_decay, self.range)

    def prepare(self, model: nn.Module, targets: Iterable[str], info: RunInfo) -> nn.Module:
        model = super().prepare(model, targets, info)
        self._begin(self.stages[0])
        return model

    def on_step(self, step: int, total: int) -> None:
        self.total_steps = int(total)
        if self.stage == 0 and step + 1 >= self.switch_at * total:
            self._switch(step + 1)

    def finalize(self, model: nn.Module, calib_batches: list | None = None) -> Finalized:
        """Run any stage not reached, harden; results ``train/switch_step``, ``train/total_steps``."""
        if self.stage == 0:
            self._switch(self.total_steps)
        self._end(self.stages[1])
        done = super().finalize(model, calib_batches)
        done.layer_extras = nm_notes(self.pattern, self.modules)
        done.results = {"train/switch_step": int(self.switch_step), "train/total_steps": int(self.total_steps)}
        return done

    def state_dict(self) -> dict[str, Any]:
        """``stage`` (0 or 1), ``switch_step`` (``None`` before the switch) and ``total_steps``."""
        return {"stage": int(self.stage), "switch_step": self.switch_step, "total_steps": int(self.total_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stage after ``prepare``; stage 1 redoes the switch (frozen mask
        buffers, enabled pattern/grid, held step) whose tensors the model's state dict
        then overwrites."""
        if int(state["stage"]) == 1 and self.stage == 0:
            self._switch(int(state["switch_step"]))
        self.switch_step = None if state["switch_step"] is None else int(state["switch_step"])
        self.total_steps = int(state["total_steps"])

    def stats(self) -> dict[str, float]:
        """Current stage, fraction of zeros in the compressed weights and most distinct values
        per quantization group. The level count costs a pass over every weight, so it is
        refreshed at each stage change and every :attr:`levels_every` calls."""
        if not self.layers:
            return {"stage": float(self.stage)}
        refresh = self._levels is None or self._levels[0] != self.stage or self._stats_calls % self.levels_every == 0
        self._stats_calls += 1
        zeros, count, levels = 0, 0, 0
        with torch.no_grad():
            for name, layer in self.layers.items():
                w_hat = layer.last if layer.last is not None else layer(original_weight(self.modules[name]))
                zeros += int((w_hat == 0).sum())
                count += w_hat.numel()
                if refresh:
                    levels = max(levels, compressed_levels(w_hat, layer))
        if refresh:
            self._levels = (self.stage, levels)
        return {"stage": float(self.stage), "sparsity": zeros / max(count, 1), "levels": float(self._levels[1])}

    def setting(self) -> str:
        return f"{self.pattern} {self.grid}"

    # ---- stage transitions ----------------------------------------------------------------
    def _switch(self, step: int) -> None:
        """End the first stage and begin the second, at optimizer step ``step``."""
        self._end(self.stages[0])
        self._begin(self.stages[1])
        self.stage = 1
        self.switch_step = int(step)

    def _begin(self, stage: str) -> None:
        for name, layer in self.layers.items():
            layer.last = None  # the cached forward belongs to the previous stage
            if stage == "prune":
                layer.enable_pattern()
            else:
                layer.enable_grid(original_weight(self.modules[name]).detach())

    def _end(self, stage: str) -> None:
        for name, layer in self.layers.items():
            if stage == "prune":
                layer.freeze_mask(original_weight(self.modules[name]).detach())
            else:
                layer.hold_grid()


def check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    """Two distinct stage names from :data:`STAGE_NAMES`, in order.

    Raises:
        ConfigError: naming ``stages`` and the allowed names.
    """
    allowed = f"two distinct stages from {', '.join(STAGE_NAMES)} (e.g. [prune, quantize])"
    if isinstance(stages, str) or not isinstance(stages, Iterable):
        raise ConfigError("stages", stages, allowed)
    names = tuple(stages)
    if len(names) != 2 or any(s not in STAGE_NAMES for s in names) or names[0] == names[1]:
        raise ConfigError("stages", list(names), allowed)
    return names
