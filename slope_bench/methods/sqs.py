"""SQS: Bayesian sparse quantized sub-distributions (Wang, Jiang, Lin, Song; arXiv 2510.08999).

Variational Bayes per targeted tensor: spike-and-slab keep gates for sparsity and a
``K = 2^w_bits``-component Gaussian mixture whose means are the codebook, implemented from
METHODS.md (§ SQS), not from the published code (whose gates ranked on raw parameters,
train/eval gate mismatch and KL shrinking kept weights are avoided). Mixture math (read-out,
codebook init with its shared-``σ`` choice, gate KL, samples): :mod:`slope_bench.mixture`;
schedule and global ranking: :mod:`slope_bench.sparsity`.

Per layer (:class:`MixtureGateWeight`): ``w̃ = (Σ_k r_k(w) μ_k) · γ ⊙ mask``, ``r`` the GMM
posterior sharpened at ``T = 0.001`` (straight-through in ``w``), gates ``γ = sigmoid(p / τ_g)``
(``τ_g = 0.01``, ``γ ≈ 0.993`` at init), ``mask`` the hard pruning mask. Loss
(:meth:`Sqs.penalty`): ``kl_weight · [Σ_j KL(Bern(γ_j) ‖ Bern(λ)) + Σ_k μ_k² / (2σ0²)]`` over
kept gates (``λ = 0.01``; Gaussian prior on the means, point estimate); ``kl_weight``
defaults to ``1 / N_train`` (per-sample ELBO, ``N_train`` from the run's ``RunInfo``).

Sparsity follows the cubic schedule of Zhu & Gupta (2017) between ``prune_start`` and
``prune_end``, one global threshold over all compressed layers ranked by ``|ŵ|·γ``; pruned
weights stay pruned (their gates leave the KL). Not published, chosen here against the
train/eval gate mismatch: from ``prune_end`` on the gates are read out (``γ = 1`` when
kept, ``hard_gates_after_prune``), so the end of training sees what is exported.
Read-out (:meth:`Sqs.finalize`): each kept weight takes its most likely component's
float16-rounded mean, pruned ones exactly 0; ``n_samples`` posterior draws ("Bayesian
averaging") are returned as ``Finalized.samples`` for the run to average their logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slope_bench import mixture
from slope_bench.errors import ConfigError, check_bits, check_bool, check_int, check_range
from slope_bench.methods.base import CompressedWeight, Compressor, Finalized, LayerSpec, RunInfo, full_precision, original_weight
from slope_bench.sparsity import Unstructured, cubic_sparsity, global_prune_masks


# ---- the parametrization ----------------------------------------------------------------
class MixtureGateWeight(CompressedWeight):
    """``W -> (Σ_k r_k(W) μ_k) · γ ⊙ mask`` for one layer (see the module docstring). The
    mixing weights start uniform, so the initial read-out is the k-means assignment.

    Args:
        weight: the layer's initial weight (k-means init, shapes).
        components: ``K``, the codebook size.
        gate_temperature: ``τ_g`` of ``γ = sigmoid(p / τ_g)``.
        gate_init: initial keep probability ``γ``.
        assign_temperature: ``T`` of the sharpened posterior.
        kmeans_iters: Lloyd iterations of the init.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        components: int,
        gate_temperature: float = 0.01,
        gate_init: float = 0.993,
        assign_temperature: float = 0.001,
        kmeans_iters: int = 20,
    ) -> None:
        super().__init__()
        w = weight.detach()
        centroids, std = mixture.init_codebook(w, components, kmeans_iters)
        self.codebook_means = nn.Parameter(centroids.clone())
        self.mixing_logits = nn.Parameter(torch.zeros_like(centroids))
        self.register_buffer("component_std", torch.tensor(std, dtype=w.dtype, device=w.device))
        self.gate_logits = nn.Parameter(torch.full_like(w, mixture.gate_logit(gate_init, gate_temperature)))
        self.register_buffer("mask", torch.ones_like(w, dtype=torch.bool))
        self.components = components
        self.gate_temperature = gate_temperature
        self.assign_temperature = assign_temperature
        self.hard_gates = False
        self.last_readout: torch.Tensor | None = None
        self.kept_gate_sum: float | None = None  # Σ γ over kept weights at the last penalty

    def keep_probability(self) -> torch.Tensor:
        """``γ = sigmoid(p / τ_g)``."""
        return torch.sigmoid(self.gate_logits / self.gate_temperature)

    def readout(self, weight: torch.Tensor) -> torch.Tensor:
        """``ŵ = Σ_k r_k(W) μ_k`` (straight-through in ``W``)."""
        return mixture.mixture_readout(weight, self.codebook_means, self.mixing_logits, self.component_std, self.assign_temperature)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with full_precision(weight):  # read-out and gates in float32 under mixed precision
            value = self.readout(weight)
            self.last_readout = value.detach()
            return value * self.mask if self.hard_gates else value * self.keep_probability() * self.mask

    @torch.no_grad()
    def score(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Global-ranking score ``|ŵ|·γ`` (``γ = 1`` once gates are read out); ``-1`` where pruned."""
        value = self.last_readout if weight is None and self.last_readout is not None else self.readout(weight)
        return mixture.gated_score(value, None if self.hard_gates else self.keep_probability(), self.mask)

    def gate_kl(self, prior_keep: float) -> torch.Tensor:
        """``Σ_j KL(Bern(γ_j) ‖ Bern(λ))`` over kept gates (0 once gates are read out)."""
        if self.hard_gates:
            return self.gate_logits.new_zeros(())
        kl, self.kept_gate_sum = mixture.kept_gate_kl(self.gate_logits / self.gate_temperature, self.mask, prior_keep)
        return kl

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """Most likely component's mean per weight (16-bit codebook); pruned weights exactly 0."""
        index = mixture.most_likely_component(weight, self.codebook_means, self.mixing_logits, self.component_std)
        return mixture.fp16_codebook(self.codebook_means)[index] * self.mask.to(weight.dtype)

    @torch.no_grad()
    def sample(self, weight: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """One posterior draw: component from the GMM posterior, gate from ``Bernoulli(γ)``."""
        gate = None if self.hard_gates else self.keep_probability()
        return mixture.sample_weights(
            weight, self.codebook_means, self.mixing_logits, self.component_std, temperature, self.mask, gate, generator
        )

    def spec(self, weight: torch.Tensor) -> LayerSpec:
        return LayerSpec(Unstructured(), "codebook", int(math.log2(self.components)), "tensor", scale_values=self.components)


# ---- the compressor ---------------------------------------------------------------------
class Sqs(Compressor):
    """SQS: spike-and-slab keep gates + a GMM codebook per layer, variational training.

    Args:
        name: the method's name in ``results.json``.
        w_bits: codebook bits, ``K = 2^w_bits`` components (1..8).
        target_sparsity: final fraction of compressed weights pruned, in ``[0, 1)``.
        initial_sparsity: ``s_i`` of the cubic schedule, in ``[0, target_sparsity]``.
        prune_start, prune_end: schedule start / end as fractions of training.
        gate_temperature: ``τ_g`` of the gates (> 0).
        gate_init: initial keep probability, in ``(0.5, 1)``.
        assign_temperature: temperature of the sharpened posterior (> 0).
        prior_keep: prior keep probability ``λ`` of the gates, in ``(0, 1)``.
        mean_prior_std: ``σ0`` of the Gaussian prior on the codebook means (> 0).
        kl_weight: scale of the KL terms (``None``: ``1 / RunInfo.num_train``; 1.0 before ``prepare``).
        n_samples: sampled networks for Bayesian averaging (0 disables it).
        sample_temperature: posterior temperature of the samples (1.0 = the GMM posterior;
            the default 0.1 is a choice measured on digits/ResNet-18, where 1.0 collapses
            the 2-bit ensemble, see ``experiments/sqs_digits_resnet18.md``).
        hard_gates_after_prune: read the gates out (``γ = 1`` when kept) from ``prune_end`` on.
        kmeans_iters: Lloyd iterations of the codebook init.
        gate_lr, codebook_lr: learning rates of the gate logits / of the codebook (``None``: the run's).
        compress_first, compress_classifier: see :class:`Compressor` (SQS: every conv incl. the first).
    """

    def __init__(
        self,
        name: str = "sqs",
        w_bits: int = 4,
        target_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        prune_start: float = 0.1,
        prune_end: float = 0.8,
        gate_temperature: float = 0.01,
        gate_init: float = 0.993,
        assign_temperature: float = 0.001,
        prior_keep: float = 0.01,
        mean_prior_std: float = 3.0,
        kl_weight: float | None = None,
        n_samples: int = 8,
        sample_temperature: float = 0.1,
        hard_gates_after_prune: bool = True,
        kmeans_iters: int = 20,
        gate_lr: float | None = None,
        codebook_lr: float | None = None,
        compress_first: bool = True,
        compress_classifier: bool = False,
    ) -> None:
        super().__init__(name, compress_first, compress_classifier)
        self.w_bits = check_bits(w_bits)
        self.components = 2**self.w_bits
        self.target_sparsity = check_range("target_sparsity", target_sparsity, 0.0, 1.0, high_open=True)
        self.initial_sparsity = check_range("initial_sparsity", initial_sparsity, 0.0, self.target_sparsity)
        self.prune_start = check_range("prune_start", prune_start, 0.0, 1.0)
        self.prune_end = check_range("prune_end", prune_end, 0.0, 1.0)
        if self.prune_start >= self.prune_end:
            raise ConfigError("prune_start", prune_start, f"a number below prune_end={prune_end}")
        self.gate_temperature = check_range("gate_temperature", gate_temperature, 0.0, low_open=True)
        self.gate_init = check_range("gate_init", gate_init, 0.5, 1.0, low_open=True, high_open=True)
        self.assign_temperature = check_range("assign_temperature", assign_temperature, 0.0, low_open=True)
        self.prior_keep = check_range("prior_keep", prior_keep, 0.0, 1.0, low_open=True, high_open=True)
        self.mean_prior_std = check_range("mean_prior_std", mean_prior_std, 0.0, low_open=True)
        self.kl_weight = None if kl_weight is None else check_range("kl_weight", kl_weight, 0.0)
        self.n_samples = check_int("n_samples", n_samples, 0)
        self.sample_temperature = check_range("sample_temperature", sample_temperature, 0.0, low_open=True)
        self.hard_gates_after_prune = check_bool("hard_gates_after_prune", hard_gates_after_prune)
        self.kmeans_iters = check_int("kmeans_iters", kmeans_iters, 0)
        groups = {"gate_logits": {"weight_decay": 0.0}, "codebook_means": {"weight_decay": 0.0}, "mixing_logits": {"weight_decay": 0.0}}
        if gate_lr is not None:
            groups["gate_logits"]["lr"] = check_range("gate_lr", gate_lr, 0.0, low_open=True)
        if codebook_lr is not None:
            groups["codebook_means"]["lr"] = groups["mixing_logits"]["lr"] = check_range("codebook_lr", codebook_lr, 0.0, low_open=True)
        self.optim_groups = groups
        self.current_sparsity = 0.0

    def make_parametrization(self, name: str, weight: torch.Tensor) -> CompressedWeight | None:
        return MixtureGateWeight(weight, self.components, self.gate_temperature, self.gate_init, self.assign_temperature, self.kmeans_iters)

    def prepare(self, model: nn.Module, targets: Iterable[str], info: RunInfo) -> nn.Module:
        model = super().prepare(model, targets, info)
        if self.initial_sparsity > 0:
            self.update_masks(self.initial_sparsity)
        return model

    def effective_kl_weight(self) -> float:
        """``kl_weight``, or ``1 / num_train`` of the run when it is ``None`` (1.0 if unknown)."""
        num_train = self.info.num_train if self.info is not None else 0
        return self.kl_weight if self.kl_weight is not None else (1.0 / num_train if num_train else 1.0)

    def penalty(self) -> torch.Tensor | float:
        """``kl_weight · [Σ gate KL + Σ_k μ_k² / (2σ0²)]`` over all compressed layers."""
        weight = self.effective_kl_weight()
        if not self.layers or weight == 0:
            return 0.0
        terms = []
        for p in self.layers.values():
            terms.append(p.gate_kl(self.prior_keep))
            terms.append(p.codebook_means.pow(2).sum() / (2 * self.mean_prior_std**2))
        return weight * torch.stack(terms).sum()

    def on_step(self, step: int, total: int) -> None:
        """Advance the cubic schedule; prune globally when the target count grows."""
        progress = (step + 1) / max(total, 1)
        target = cubic_sparsity(progress, self.initial_sparsity, self.target_sparsity, self.prune_start, self.prune_end)
        if target > self.current_sparsity:
            self.update_masks(target)
        if self.hard_gates_after_prune and progress >= self.prune_end:
            for p in self.layers.values():
                p.hard_gates = True

    def finalize(self, model: nn.Module, calib_batches: list | None = None) -> Finalized:
        """Prune to the final target, draw the posterior samples, export the most likely means."""
        self.update_masks(self.target_sparsity, fresh=True)
        with torch.no_grad():
            samples = [
                {n: p.sample(original_weight(self.modules[n]).detach(), self.sample_temperature) for n, p in self.layers.items()}
                for _ in range(self.n_samples)
            ]
            extras = {
                name: {
                    "codebook_size": p.components,
                    "gate_mean_kept": float(p.keep_probability()[p.mask].mean()) if p.mask.any() else 0.0,
                    "mask_sparsity": 1.0 - float(p.mask.float().mean()),
                }
                for name, p in self.layers.items()
            }
        total = sum(p.mask.numel() for p in self.layers.values())
        pruned = sum(int((~p.mask).sum()) for p in self.layers.values())
        results = {
            "sqs/mask_sparsity": pruned / max(total, 1),
            "sqs/kl_weight": self.effective_kl_weight(),
            "sqs/ensemble_size": float(len(samples)),
        }
        done = super().finalize(model, calib_batches)
        return Finalized(specs=done.specs, layer_extras=extras, results=results, samples=samples)

    def state_dict(self) -> dict[str, Any]:
        """``current_sparsity`` of the schedule and each layer's ``hard_gates`` flag (the
        masks, gates and codebooks are tensors of the model's state dict)."""
        return {"current_sparsity": float(self.current_sparsity), "hard_gates": {n: bool(p.hard_gates) for n, p in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after ``prepare`` (the masks then load with the model)."""
        self.current_sparsity = float(state["current_sparsity"])
        for name, flag in state["hard_gates"].items():
            self.layers[name].hard_gates = bool(flag)

    @torch.no_grad()
    def update_masks(self, sparsity: float, fresh: bool = False) -> None:
        """Global pruning to ``sparsity`` (a fraction of all compressed weights) by ``|ŵ|·γ``;
        pruned weights stay pruned. ``fresh``: ``ŵ`` from the current weights, not the
        cached forward."""
        if not self.layers:
            self.current_sparsity = sparsity
            return
        names = list(self.layers)
        cached = not fresh and all(self.layers[n].last_readout is not None for n in names)
        scores = [self.layers[n].score(None if cached else original_weight(self.modules[n])) for n in names]
        masks = global_prune_masks(scores, sparsity)
        for name, mask in zip(names, masks, strict=True):
            self.layers[name].mask.copy_(mask & self.layers[name].mask)
        self.current_sparsity = sparsity

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        if not self.layers:
            return {}
        kept = sum(
            p.kept_gate_sum if p.kept_gate_sum is not None else float(p.keep_probability()[p.mask].sum()) for p in self.layers.values()
        )
        count = sum(int(p.mask.sum()) for p in self.layers.values())
        return {"sparsity_target": self.current_sparsity, "gate_mean_kept": kept / max(count, 1)}

    def setting(self) -> str:
        return f"{round(100 * self.target_sparsity)}% unstructured w{self.w_bits}"
