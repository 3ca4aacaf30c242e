"""The written contract of ``slope_bench.methods.base``, for every ``conf/method/*.yaml``.

On the toy model of ``tests/methods/toy.py`` (first layer and classifier declared, a
depthwise convolution, a layer N:M cannot apply to):

* what a method declares (:class:`Requirements`) and what ``finalize`` returns
  (:class:`Finalized`, a spec for every target, notes for layers left unpruned);
* ``supports``: OBC refuses the grouped convolution (it stays dense, untouched), every
  other method compresses it;
* resume: ``k`` steps, then ``compressor.state_dict()`` (through JSON: plain data only),
  the model's and the optimizer's state; a fresh model and compressor are prepared, loaded
  (the model strictly) and run to the end. The finalized weights, specs, extras, results
  and posterior samples equal those of an uninterrupted run bit for bit, without replaying
  ``on_step``. ``k`` is chosen before and after Sequential's switch and SQS's hard gates.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from slope_bench.loop import drive, param_groups
from slope_bench.methods.base import Compressor, Finalized, Requirements, RunInfo, nm_reason
from slope_bench.models import choose_targets
from tests.conftest import METHODS, method_from_yaml
from tests.methods.toy import GROUPED_LAYER, ODD_LAYER, Toy, task_loss, toy_batches

TOTAL = 10  # training steps of every resume run
INFO = RunInfo(num_train=64, seed=0)
LR, WD = 1e-2, 1e-4
TIMING = ("solve_s",)


@pytest.mark.parametrize("method", METHODS)
def test_declared_and_returned_values_are_typed(method) -> None:
    compressor = method_from_yaml(method)
    needs = compressor.requirements
    assert isinstance(needs, Requirements)
    assert needs.calib_samples >= 0 and needs.calib_passes >= 1
    assert needs.trains or method in ("obc", "magnitude_rtn")
    torch.manual_seed(0)
    model = Toy()
    driven = drive(model, compressor, toy_batches(), task_loss, steps=2, info=INFO)
    done = driven.finalized
    assert isinstance(done, Finalized)
    assert set(done.specs) == set(driven.targets) and driven.targets
    assert ("stem" in driven.targets) == compressor.compress_first
    assert "fc" not in driven.targets  # no method compresses the classifier by default
    assert len(driven.step_seconds) == (2 if needs.trains else 0)
    assert set(done.layer_extras) <= set(driven.targets)
    pattern = getattr(compressor, "pattern", None)
    if nm_reason(pattern, model.get_submodule(ODD_LAYER)) is not None:  # methods with an N:M pattern
        assert done.layer_extras[ODD_LAYER]["note"].startswith(f"{pattern} not applied")
    json.dumps({"results": done.results, "layer_extras": done.layer_extras})  # report-ready plain values


@pytest.mark.parametrize("method", METHODS)
def test_grouped_convolution_is_skipped_by_obc_only(method) -> None:
    compressor = method_from_yaml(method)
    model = Toy()
    targets, skipped = choose_targets(model, compressor)
    if method == "obc":
        assert GROUPED_LAYER not in targets and "groups=16" in skipped[GROUPED_LAYER]
        dense = model.depthwise.weight.detach().clone()
        drive(model, compressor, toy_batches(), task_loss, info=INFO)
        assert torch.equal(model.depthwise.weight, dense)
    else:
        assert GROUPED_LAYER in targets and not skipped


# ---------------------------------------------------------------------------------- resume
def seeded_finalize(compressor: Compressor) -> None:
    """Seed the global RNG right before ``finalize`` (posterior samples draw from it)."""
    finalize = compressor.finalize

    def wrapped(model: nn.Module, calib: list | None = None) -> Finalized:
        torch.manual_seed(123)
        return finalize(model, calib)

    compressor.finalize = wrapped


def run_steps(model: nn.Module, compressor: Compressor, optimizer, batches: list, start: int, stop: int, total: int) -> None:
    """Steps ``start .. stop - 1`` of the four-hook loop, exactly as :func:`drive` runs them."""
    model.train()
    for step in range(start, stop):
        loss = task_loss(model, batches[step % len(batches)]) + compressor.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        compressor.on_step(step, total)


def fresh(method) -> tuple[nn.Module, Compressor]:
    torch.manual_seed(0)
    compressor = method_from_yaml(method)
    seeded_finalize(compressor)
    return Toy(), compressor


def finalized_record(model: nn.Module, done: Finalized) -> dict:
    extras = {n: {k: v for k, v in e.items() if k not in TIMING} for n, e in done.layer_extras.items()}
    return {
        "state": model.state_dict(),
        "specs": done.specs,
        "extras": extras,
        "results": {k: v for k, v in done.results.items() if not k.startswith("time/")},
        "samples": done.samples,
    }


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for name, tensor in a["state"].items():
        other = b["state"][name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
        same = torch.equal(tensor.view(torch.uint8), other.view(torch.uint8)) if tensor.is_floating_point() else torch.equal(tensor, other)
        assert same, f"{name} differs after resume"
    assert a["specs"] == b["specs"] and a["extras"] == b["extras"] and a["results"] == b["results"]
    assert len(a["samples"]) == len(b["samples"])
    for x, y in zip(a["samples"], b["samples"], strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def resumed(method: str, k: int, batches: list) -> tuple[dict, dict]:
    """Run ``k`` steps, checkpoint, resume in a fresh model and compressor, finish; returns
    the finalized record and the compressor state that was checkpointed."""
    model, compressor = fresh(method)
    targets, _ = choose_targets(model, compressor)
    compressor.prepare(model, targets, INFO)
    total = TOTAL if compressor.requirements.trains else 0
    k = min(k, total)
    optimizer = torch.optim.AdamW(param_groups(model, compressor, LR, WD), lr=LR, weight_decay=WD)
    run_steps(model, compressor, optimizer, batches, 0, k, total)
    checkpoint = {
        "compressor": json.loads(json.dumps(compressor.state_dict())),  # plain data only
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    del model, compressor, optimizer

    # the run's order: prepare -> compressor state -> model tensors (strict) -> optimizer
    model, compressor = fresh(method)
    targets, _ = choose_targets(model, compressor)
    compressor.prepare(model, targets, INFO)
    start_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compressor.load_state_dict(checkpoint["compressor"])
    model.load_state_dict(checkpoint["model"], strict=True)
    for n, p in model.named_parameters():  # the optimizer is built with the flags of a fresh fit ...
        p.requires_grad_(start_flags[n])
    optimizer = torch.optim.AdamW(param_groups(model, compressor, LR, WD), lr=LR, weight_decay=WD)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for n, p in model.named_parameters():  # ... then the checkpoint's flags apply (a held step)
        p.requires_grad_(checkpoint["requires_grad"][n])
    assert compressor.state_dict() == checkpoint["compressor"]
    run_steps(model, compressor, optimizer, batches, k, total, total)
    done = compressor.finalize(model, [x for x, _ in batches] * compressor.requirements.calib_passes)
    return finalized_record(model, done), checkpoint["compressor"]


@pytest.mark.parametrize("k", [3, 8], ids=["early", "late"])
@pytest.mark.parametrize("method", METHODS)
def test_resume_restores_state_exactly_without_replay(method, k: int) -> None:
    batches = toy_batches()
    model, compressor = fresh(method)
    trains = compressor.requirements.trains
    driven = drive(model, compressor, batches, task_loss, steps=TOTAL, info=INFO, lr=LR, weight_decay=WD)
    uninterrupted = finalized_record(model, driven.finalized)
    record, state = resumed(method, k, batches)
    assert_bit_identical(uninterrupted, record)
    if method in ("prune_then_quantize", "quantize_then_prune"):
        assert state == (
            {"stage": 1, "switch_step": 5, "total_steps": TOTAL} if k == 8 else {"stage": 0, "switch_step": None, "total_steps": TOTAL}
        )
    elif method == "sqs":
        assert state["hard_gates"] == dict.fromkeys(driven.targets, k == 8)  # prune_end = 0.8: hard from step 8 on
        assert 0 < state["current_sparsity"] <= 0.5
    elif not trains:
        assert state == {}
