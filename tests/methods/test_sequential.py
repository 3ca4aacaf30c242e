"""Sequential baselines: stages, frozen mask, held grid, budget, invariants, bad input."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from slope_bench.errors import ConfigError
from slope_bench.methods.sequential import Sequential, StagedWeight, compressed_levels
from slope_bench.quant import fake_quantize
from slope_bench.sparsity import NM, satisfies_nm

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"
TARGETS = ["features.0", "features.2", "head"]


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    model.head = nn.Linear(8, 3)
    model.forward = lambda x: model.head(model.features(x).mean((2, 3)))
    return model


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, 6, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def train(compressor, model, steps: int, total: int | None = None, start: int = 0, optimizer=None, lr: float = 1e-2):
    """A miniature of the pipeline's loop: loss + penalty, AdamW step, ``on_step``."""
    total = steps if total is None else total
    x, y = toy_data()
    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(start, start + steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y) + compressor.penalty()
        loss.backward()
        optimizer.step()
        compressor.on_step(step, total)
    return optimizer


def original(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).parametrizations.weight.original


def build(stages, **kwargs):
    compressor = Sequential(stages=stages, **kwargs)
    compressor.num_train = 16
    model = compressor.prepare(toy_model(), TARGETS)
    return compressor, model


def positive_levels(weight: torch.Tensor) -> int:
    rows = weight.reshape(weight.shape[0], -1)
    return max(int(torch.unique(row[row > 0]).numel()) for row in rows)


def test_prune_then_quantize_mask_stays_frozen_while_weights_move():
    compressor, model = build(["prune", "quantize"], w_bits=4)
    layer = compressor.layers["features.2"]
    assert isinstance(layer, StagedWeight)
    assert layer.pattern is not None and layer.grid is None  # stage 0: SR-STE only
    optimizer = train(compressor, model, 5, total=10)
    assert compressor.stage == 1 and compressor.switch_step == 5
    frozen = layer.frozen_mask.clone()
    weight = original(model, "features.2").detach().clone()
    step = layer.step.detach().clone()
    train(compressor, model, 5, total=10, start=5, optimizer=optimizer)
    moved = original(model, "features.2").detach()
    assert (moved - weight).abs().max() > 1e-3  # the weights keep training ...
    assert torch.equal(layer.frozen_mask, frozen)  # ... the mask does not
    assert torch.equal(layer.mask(moved), frozen)
    assert not torch.equal(layer.step.detach(), step)  # LSQ learns its step in stage 1
    w_hat = model.get_submodule("features.2").weight
    assert torch.equal(w_hat != 0, (frozen != 0) & (w_hat != 0))
    assert float((w_hat == 0).float().mean()) >= 0.5


def test_quantize_then_prune_holds_the_grid_in_stage_two():
    compressor, model = build(["quantize", "prune"], w_bits=3)
    layer = compressor.layers["features.2"]
    assert layer.pattern is None and layer.grid is not None  # stage 0: LSQ only, dense
    initial_step = layer.step.detach().clone()
    optimizer = train(compressor, model, 4, total=8)
    assert not torch.equal(layer.step.detach(), initial_step)  # LSQ learned in stage 0
    assert compressor.stage == 1 and compressor.switch_step == 4
    assert layer.mask_source == "quantized" and not layer.step.requires_grad
    held = layer.step.detach().clone()
    weight = original(model, "features.2").detach().clone()
    train(compressor, model, 4, total=8, start=4, optimizer=optimizer)
    assert torch.equal(layer.step.detach(), held)
    assert (original(model, "features.2").detach() - weight).abs().max() > 1e-3
    compressor.finalize(model, [])
    assert torch.equal(layer.step.detach(), held)


def test_mask_of_quantize_then_prune_is_chosen_on_quantized_weights():
    compressor, model = build(["quantize", "prune"], w_bits=2)
    train(compressor, model, 2, total=2)
    layer = compressor.layers["features.2"]
    w = original(model, "features.2").detach()
    quantized = fake_quantize(w, layer.step.detach(), layer.grid).abs().reshape(8, -1, 4)
    mask = layer.mask(w).reshape(8, -1, 4).bool()
    assert torch.equal(mask.sum(-1), torch.full(mask.shape[:2], 2))
    kept = torch.where(mask, quantized, torch.inf).amin(-1)
    dropped = torch.where(mask, -torch.inf, quantized).amax(-1)
    assert torch.all(kept >= dropped)  # every kept |Q(w)| >= every dropped one


def test_stats_follow_the_stages():
    compressor, model = build(["quantize", "prune"], w_bits=4)
    train(compressor, model, 1, total=4)
    first = compressor.stats()
    # stage 0 is dense LSQ: the only zeros are weights rounded to code 0
    assert first["stage"] == 0.0 and 0.0 < first["sparsity"] < 0.4 and 2 < first["levels"] <= 15
    train(compressor, model, 3, total=4, start=1)
    second = compressor.stats()
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
    compressor, model = build(stages, w_bits=bits)
    train(compressor, model, 6, total=6)
    model = compressor.finalize(model, [])
    qmax = 2 ** (bits - 1) - 1
    for name in TARGETS:
        module = model.get_submodule(name)
        assert not parametrize.is_parametrized(module)
        spec = compressor.specs[name]
        assert spec.pattern == NM(2, 4) and spec.grid == "uniform" and spec.bits == bits
        assert spec.scale_values == module.weight.shape[0]
        assert satisfies_nm(module.weight, NM(2, 4))
        assert positive_levels(module.weight) <= qmax
        assert positive_levels(-module.weight) <= qmax
    assert compressor.extra_results == {"train/switch_step": 3, "train/total_steps": 6}
    assert compressor.setting() == f"2:4 w{bits}"


def test_finalize_without_training_applies_both_stages():
    for stages in (["prune", "quantize"], ["quantize", "prune"]):
        compressor, model = build(stages, w_bits=3)
        model = compressor.finalize(model, [])
        weight = model.get_submodule("features.2").weight
        assert satisfies_nm(weight, NM(2, 4)) and positive_levels(weight) <= 3
        assert compressor.extra_results == {"train/switch_step": 0, "train/total_steps": 0}


def test_the_order_is_real():
    masks = {}
    for stages in (["prune", "quantize"], ["quantize", "prune"]):
        compressor, model = build(stages, w_bits=4)
        train(compressor, model, 8, total=8)
        model = compressor.finalize(model, [])
        masks[stages[0]] = torch.cat([compressor.layers[n].frozen_mask.flatten() for n in TARGETS])
        nonzero = torch.cat([(model.get_submodule(n).weight != 0).flatten() for n in TARGETS])
        assert torch.all(masks[stages[0]][nonzero] == 1)  # the finalized zeros include the mask's
    assert float(masks["prune"].mean()) == float(masks["quantize"].mean()) == 0.5
    assert not torch.equal(masks["prune"], masks["quantize"])


def test_switch_point_follows_switch_at():
    compressor, model = build(["prune", "quantize"], switch_at=0.25)
    train(compressor, model, 8, total=8)
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
    assert cfg.pop("name") == name and cfg.pop("epochs") is None
    compressor = hydra.utils.instantiate(cfg)
    assert compressor.stages == stages and compressor.name == name
    assert compressor.setting() == "2:4 w4" and compressor.switch_at == 0.5
