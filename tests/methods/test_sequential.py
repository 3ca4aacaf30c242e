"""Sequential baselines: stages, frozen mask, held grid, budget, invariants, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.loop import Driven, drive
from slope_bench.methods.base import RunInfo
from slope_bench.methods.sequential import Sequential, StagedWeight, compressed_levels
from slope_bench.quant import fake_quantize
from slope_bench.sparsity import NM, as_matrix, satisfies_nm

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"
TARGETS = ["features.0", "features.2", "head"]
INFO = RunInfo(num_train=16)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    model.head = nn.Linear(8, 3)
    model.first_layers, model.classifier_layers = [], []
    model.forward = lambda x: model.head(model.features(x).mean((2, 3)))
    return model


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, 6, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def run(
    compressor: Sequential,
    steps: int,
    at: dict[int, Callable[[nn.Module], None]] | None = None,
    before_finalize: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, Driven]:
    """``steps`` AdamW steps (lr 1e-2) on one batch through the shared loop, then ``finalize``.

    ``at[step](model)`` runs right after ``on_step(step, steps)``; ``before_finalize(model)``
    between the last step and ``finalize`` (the model is the one being trained).
    """
    model = toy_model()
    on_step, finalize = compressor.on_step, compressor.finalize

    def watched_on_step(step: int, total: int) -> None:
        on_step(step, total)
        if at and step in at:
            at[step](model)

    def watched_finalize(m: nn.Module, calib: list | None = None):
        if before_finalize is not None:
            before_finalize(m)
        return finalize(m, calib)

    compressor.on_step, compressor.finalize = watched_on_step, watched_finalize
    driven = drive(
        model,
        compressor,
        [toy_data()],
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        steps=steps,
        info=INFO,
        lr=1e-2,
        weight_decay=0.01,
    )
    assert driven.targets == TARGETS
    return model, driven


def original(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).parametrizations.weight.original


def build(stages, **kwargs):
    compressor = Sequential(stages=stages, **kwargs)
    model = compressor.prepare(toy_model(), TARGETS, INFO)
    return compressor, model


def positive_levels(weight: torch.Tensor) -> int:
    rows = weight.reshape(weight.shape[0], -1)
    return max(int(torch.unique(row[row > 0]).numel()) for row in rows)


def test_prune_then_quantize_mask_stays_frozen_while_weights_move():
    compressor = Sequential(stages=["prune", "quantize"], w_bits=4)
    seen = {}

    def at_start(model: nn.Module) -> None:
        layer = compressor.layers["features.2"]
        assert isinstance(layer, StagedWeight)
        assert layer.pattern is not None and layer.grid is None  # stage 0: SR-STE only
        assert compressor.stage == 0

    def at_switch(model: nn.Module) -> None:
        layer = compressor.layers["features.2"]
        assert compressor.stage == 1 and compressor.switch_step == 5
        seen.update(
            frozen=layer.frozen_mask.clone(), weight=original(model, "features.2").detach().clone(), step=layer.step.detach().clone()
        )

    def at_end(model: nn.Module) -> None:
        layer = compressor.layers["features.2"]
        moved = original(model, "features.2").detach()
        assert (moved - seen["weight"]).abs().max() > 1e-3  # the weights keep training ...
        assert torch.equal(layer.frozen_mask, seen["frozen"])  # ... the mask does not
        assert torch.equal(layer.mask(moved), seen["frozen"])
        assert not torch.equal(layer.step.detach(), seen["step"])  # LSQ learns its step in stage 1
        w_hat = model.get_submodule("features.2").weight
        assert torch.equal(w_hat != 0, (seen["frozen"] != 0) & (w_hat != 0))
        assert float((w_hat == 0).float().mean()) >= 0.5
        seen["end"] = True

    run(compressor, 10, at={0: at_start, 4: at_switch}, before_finalize=at_end)
    assert seen["end"]


def test_quantize_then_prune_holds_the_grid_in_stage_two():
    compressor = Sequential(stages=["quantize", "prune"], w_bits=3)
    seen = {}

    def at_start(model: nn.Module) -> None:
        layer = compressor.layers["features.2"]
        assert layer.pattern is None and layer.grid is not None  # stage 0: LSQ only, dense
        seen["initial"] = layer.step.detach().clone()

    def at_switch(model: nn.Module) -> None:
        layer = compressor.layers["features.2"]
        assert not torch.equal(layer.step.detach(), seen["initial"])  # LSQ keeps learning in stage 0
        assert compressor.stage == 1 and compressor.switch_step == 4
        assert layer.mask_source == "quantized" and not layer.step.requires_grad
        seen.update(held=layer.step.detach().clone(), weight=original(model, "features.2").detach().clone())

    def at_end(model: nn.Module) -> None:
        assert torch.equal(compressor.layers["features.2"].step.detach(), seen["held"])
        assert (original(model, "features.2").detach() - seen["weight"]).abs().max() > 1e-3

    run(compressor, 8, at={0: at_start, 3: at_switch}, before_finalize=at_end)
    assert torch.equal(compressor.layers["features.2"].step.detach(), seen["held"])


def test_mask_of_quantize_then_prune_is_chosen_on_quantized_weights():
    compressor = Sequential(stages=["quantize", "prune"], w_bits=2)

    def check(model: nn.Module) -> None:
        layer = compressor.layers["features.2"]
        w = original(model, "features.2").detach()
        quantized = as_matrix(fake_quantize(w, layer.step.detach(), layer.grid).abs(), "channel_major").reshape(8, -1, 4)
        mask = as_matrix(layer.mask(w), "channel_major").reshape(8, -1, 4).bool()
        assert torch.equal(mask.sum(-1), torch.full(mask.shape[:2], 2))
        kept = torch.where(mask, quantized, torch.inf).amin(-1)
        dropped = torch.where(mask, -torch.inf, quantized).amax(-1)
        assert torch.all(kept >= dropped)  # every kept |Q(w)| >= every dropped one

    run(compressor, 2, at={1: check})


def test_stats_follow_the_stages():
    compressor = Sequential(stages=["quantize", "prune"], w_bits=4)
    stats = {}
    run(compressor, 4, at={0: lambda m: stats.update(first=compressor.stats()), 3: lambda m: stats.update(second=compressor.stats())})
    first, second = stats["first"], stats["second"]
    # stage 0 is dense LSQ: the only zeros are weights rounded to code 0
    assert first["stage"] == 0.0 and 0.0 < first["sparsity"] < 0.4 and 2 < first["levels"] <= 15
    assert second["stage"] == 1.0
    assert 0.5 <= second["sparsity"] < 0.75 and second["levels"] <= 15


def test_levels_counts_codes_per_channel():
    compressor, model = build(["quantize", "prune"], w_bits=2)
    staged = compressor.layers["head"]
    staged.step.data.fill_(0.5)
    w_hat = torch.tensor([[0.5, -0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]] * 3)
    assert compressed_levels(w_hat, staged) == 3
    staged.grid = None
    assert compressed_levels(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), staged) == 3


@pytest.mark.parametrize("stages,bits", [(["prune", "quantize"], 4), (["quantize", "prune"], 4), (["prune", "quantize"], 2)])
def test_finalize_gives_nm_sparse_weights_on_the_grid(stages, bits):
    compressor = Sequential(stages=stages, w_bits=bits)
    model, driven = run(compressor, 6)
    done = driven.finalized
    qmax = 2 ** (bits - 1) - 1  # LSQ's signed grid: qmax positive levels, qmax + 1 negative ones
    pattern = NM(2, 4, "channel_major")
    for name in TARGETS:
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        spec = done.specs[name]
        assert spec.pattern == pattern and spec.grid == "uniform" and spec.bits == bits
        assert (spec.grid_kind, spec.grid_range) == ("signed", "lsq")
        assert spec.scale_values == module.weight.shape[0]
        assert satisfies_nm(module.weight, pattern)
        assert positive_levels(module.weight) <= qmax
        assert positive_levels(-module.weight) <= qmax + 1
    assert done.results == {"train/switch_step": 3, "train/total_steps": 6}
    assert done.layer_extras == {}  # N:M applies to every layer
    assert compressor.setting() == f"2:4 w{bits}"


def test_finalize_without_training_applies_both_stages():
    for stages in (["prune", "quantize"], ["quantize", "prune"]):
        compressor, model = build(stages, w_bits=3)
        done = compressor.finalize(model, [])
        weight = model.get_submodule("features.2").weight
        assert satisfies_nm(weight, NM(2, 4, "channel_major")) and positive_levels(weight) <= 3
        assert done.results == {"train/switch_step": 0, "train/total_steps": 0}


def test_the_order_is_real():
    masks = {}
    for stages in (["prune", "quantize"], ["quantize", "prune"]):
        compressor = Sequential(stages=stages, w_bits=4)
        model, _ = run(compressor, 8)
        masks[stages[0]] = torch.cat([compressor.layers[n].frozen_mask.flatten() for n in TARGETS])
        nonzero = torch.cat([(model.get_submodule(n).weight != 0).flatten() for n in TARGETS])
        assert torch.all(masks[stages[0]][nonzero] == 1)  # the finalized zeros include the mask's
    assert float(masks["prune"].mean()) == float(masks["quantize"].mean()) == 0.5
    assert not torch.equal(masks["prune"], masks["quantize"])


def test_switch_point_follows_switch_at():
    compressor = Sequential(stages=["prune", "quantize"], switch_at=0.25)
    run(compressor, 8)
    assert compressor.switch_step == 2


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"switch_at": 0.0}, "switch_at"),
        ({"switch_at": 1.0}, "switch_at"),
        ({"switch_at": 1.5}, "switch_at"),
        ({"switch_at": "half"}, "switch_at"),
        ({"stages": ["prune", "distill"]}, "stages"),
        ({"stages": ["prune", "prune"]}, "stages"),
        ({"stages": ["prune"]}, "stages"),
        ({"stages": "prune"}, "stages"),
        ({"n": 3, "m": 2}, "n"),
        ({"n": None, "m": None}, "n"),
        ({"m": 0}, "m"),
        ({"w_bits": 9}, "w_bits"),
        ({"w_bits": None}, "w_bits"),
        ({"granularity": "row"}, "granularity"),
        ({"sr_ste_decay": -1.0}, "sr_ste_decay"),
    ],
)
def test_bad_input_raises_config_error(kwargs, key):
    with pytest.raises(ConfigError) as error:
        Sequential(**kwargs)
    assert error.value.key == key


def test_unknown_stage_names_the_allowed_stages():
    with pytest.raises(ConfigError, match=r"stages=.*prune, quantize"):
        Sequential(stages=["quantize", "sparsify"])


@pytest.mark.parametrize("name,stages", [("prune_then_quantize", ("prune", "quantize")), ("quantize_then_prune", ("quantize", "prune"))])
def test_method_configs_compose(name, stages):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.pop("search", None)  # the tuning space is not a constructor argument (the run drops it)
    assert "epochs" not in cfg
    compressor = hydra.utils.instantiate(cfg)
    assert compressor.stages == stages and compressor.name == name
    assert compressor.setting() == "2:4 w4" and compressor.switch_at == 0.5


def test_name_defaults_to_the_stage_order():
    assert Sequential(stages=["quantize", "prune"]).name == "quantize_then_prune"
    assert Sequential(name="qtp", stages=["quantize", "prune"]).name == "qtp"
