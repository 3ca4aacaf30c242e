"""Resilience: resume after a crash or a kill, failed jobs recorded, divergence, determinism,
safe loading and integrity-checked, concurrency-safe caches."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file
from torch import nn

from slope_bench.distributed import state_digest
from slope_bench.errors import ConfigError
from slope_bench.lit import DivergenceError, LitCompress
from slope_bench.methods.base import RunInfo
from slope_bench.models import choose_targets
from slope_bench.references import Reference, cached_training, load_cached
from slope_bench.train import run
from tests.conftest import METHODS, ROOT, SHRINK, ToyNet, compose_config, method_from_yaml

TIMING_KEYS = ("time/",)


def comparable(results: dict) -> dict:
    """Results without wall-clock timings."""
    return {k: v for k, v in results.items() if not k.startswith(TIMING_KEYS)}


# ---------------------------------------------------------------------------- compressor state
def toy_run(method: str):
    torch.manual_seed(0)
    compressor = method_from_yaml(method)
    model = ToyNet()
    model = compressor.prepare(model, choose_targets(model, compressor)[0], RunInfo(num_train=64))
    return compressor.requirements.trains, compressor, model


def toy_steps(model: nn.Module, compressor, steps: range, total: int) -> None:
    """Plain SGD (no optimizer state) on fixed batches; the RNG is reseeded per step."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        torch.manual_seed(1000 + step)
        loss = nn.functional.cross_entropy(model(x), y) + compressor.penalty()
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None and p.requires_grad:
                    p -= 0.05 * p.grad
        compressor.on_step(step, total)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_restores_compressor_state_exactly(method):
    """Any method: the state saved at step k (tensors + the compressor's state_dict, through
    a ``weights_only=True`` round trip) restores into a fresh model and compressor, which
    then continue step for step like the uninterrupted one (no on_step replay)."""
    trains, c_a, m_a = toy_run(method)
    if not trains:
        pytest.skip("post-training method: no fit to resume")
    total, cut = 8, 5
    toy_steps(m_a, c_a, range(cut), total)
    lit_a = LitCompress(m_a, None, c_a, optimizer=partial(torch.optim.SGD, lr=0.05))
    checkpoint = {
        "global_step": cut,
        "state_dict": lit_a.state_dict(),
        "slope_bench": {
            "compressor": c_a.state_dict(),
            "requires_grad": {n: p.requires_grad for n, p in m_a.named_parameters()},
            "total_steps": total,
            "rng": {},
        },
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    _, c_b, m_b = toy_run(method)
    lit_b = LitCompress(m_b, None, c_b, optimizer=partial(torch.optim.SGD, lr=0.05))
    lit_b.on_load_checkpoint(loaded)
    lit_b.load_state_dict(loaded["state_dict"], strict=True)
    lit_b.restore_requires_grad()
    assert state_digest(m_b, c_b) == state_digest(m_a, c_a)

    toy_steps(m_a, c_a, range(cut, total), total)
    toy_steps(m_b, c_b, range(cut, total), total)
    assert state_digest(m_b, c_b) == state_digest(m_a, c_a)
    c_a.finalize(m_a, None)
    c_b.finalize(m_b, None)
    final_a, final_b = m_a.state_dict(), m_b.state_dict()
    for k in final_a:
        torch.testing.assert_close(final_b[k], final_a[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------- resume a real run
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, shared_cache, monkeypatch):
    """A run that dies after its first checkpoint, rerun with ``resume=true`` in the same
    run dir, ends with exactly the state of a run that was never interrupted (here across
    the prune -> quantize switch, which happened before the checkpoint)."""
    overrides = [*SHRINK, "method=prune_then_quantize", "method.switch_at=0.2", "finetune.epochs=2", "control.dense_ft=false"]
    whole = run(compose_config(overrides, tmp_path / "whole", shared_cache))

    class Crash(RuntimeError):
        pass

    def crash_in_second_epoch(self):
        if self.current_epoch == 1 and type(self.compressor).__name__ != "Compressor":
            raise Crash("simulated crash")

    cfg = compose_config(overrides, tmp_path / "crashed", shared_cache)
    monkeypatch.setattr(LitCompress, "on_train_epoch_start", crash_in_second_epoch)
    with pytest.raises(Crash):
        run(cfg)
    monkeypatch.undo()
    out = Path(cfg.paths.output_dir)
    saved = torch.load(out / "checkpoints/compress/last.ckpt", weights_only=True)
    assert saved["global_step"] == whole["train/steps"] // 2
    assert saved["slope_bench"]["compressor"]["stage"] == 1
    assert not (out / "results.json").exists()

    with open_dict(cfg):
        cfg.resume = True
    resumed = run(cfg)
    assert comparable(resumed) == comparable(whole)
    a, b = load_file(tmp_path / "whole/run/finalized.safetensors"), load_file(out / "finalized.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoints").exists(), "resume points are removed once the run is recorded"


class Payload:
    """Pickles to a call that touches a file: what an unsafe ``torch.load`` would execute."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_resume_sets_aside_a_checkpoint_that_is_not_plain_data(tmp_path, shared_cache):
    """A checkpoint that is not plain data is never executed: it is set aside and the phase restarts."""
    cfg = compose_config([*SHRINK, "control.dense_ft=false", "++resume=true"], tmp_path, shared_cache)
    marker = tmp_path / "executed"
    ckpt = Path(cfg.paths.output_dir) / "checkpoints/compress/last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": Payload(marker)}, ckpt)
    results = run(cfg)
    assert results["status"] == "ok"
    assert not marker.exists(), "the checkpoint's code must never run"


def crash_then(overrides: list[str], tmp_path: Path, shared_cache: Path, monkeypatch) -> tuple:
    """Run ``overrides`` until a crash in the second compression epoch; returns (cfg, run dir)."""

    class Crash(RuntimeError):
        pass

    def crash_in_second_epoch(self):
        if self.current_epoch == 1 and type(self.compressor).__name__ != "Compressor":
            raise Crash("simulated crash")

    cfg = compose_config(overrides, tmp_path, shared_cache)
    with monkeypatch.context() as patch:
        patch.setattr(LitCompress, "on_train_epoch_start", crash_in_second_epoch)
        with pytest.raises(Crash):
            run(cfg)
    return cfg, Path(cfg.paths.output_dir)


def test_checkpoint_every_zero_leaves_no_resume_point_and_a_resume_restarts(tmp_path, shared_cache, monkeypatch):
    """``checkpoint_every=0`` (what the bench's short runs use): nothing is written, and a
    rerun with ``resume=true`` trains the phase again to the same result."""
    overrides = [*SHRINK, "finetune.epochs=2", "control.dense_ft=false", "checkpoint_every=0"]
    whole = run(compose_config(overrides, tmp_path / "whole", shared_cache))
    cfg, out = crash_then(overrides, tmp_path / "crashed", shared_cache, monkeypatch)
    assert not (out / "checkpoints").exists()
    with open_dict(cfg):
        cfg.resume = True
    assert comparable(run(cfg)) == comparable(whole)


def test_resume_with_another_configuration_is_refused(tmp_path, shared_cache, monkeypatch):
    overrides = [*SHRINK, "finetune.epochs=2", "control.dense_ft=false"]
    cfg, out = crash_then(overrides, tmp_path, shared_cache, monkeypatch)
    changed = compose_config([*overrides, "method.w_bits=3", "++resume=true"], tmp_path, shared_cache)
    with pytest.raises(ConfigError, match=r"^resume=True is not allowed: .*method\.w_bits is 3 here, 4 there"):
        run(changed)
    assert not (out / "results.json").exists() and (out / "checkpoints/compress/last.ckpt").is_file()


def test_resume_sets_aside_a_truncated_checkpoint_and_keeps_timings(tmp_path, shared_cache, monkeypatch):
    overrides = [*SHRINK, "finetune.epochs=2", "control.dense_ft=false"]
    cfg, out = crash_then(overrides, tmp_path, shared_cache, monkeypatch)
    last = out / "checkpoints/compress/last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with open_dict(cfg):
        cfg.resume = True
    results = run(cfg)
    assert results["status"] == "ok" and results["time/step_ms"] is not None and results["time/step_ms"] > 0


def test_a_resumed_run_keeps_its_timings(tmp_path, shared_cache, monkeypatch):
    overrides = [*SHRINK, "finetune.epochs=2", "control.dense_ft=false"]
    cfg, out = crash_then(overrides, tmp_path, shared_cache, monkeypatch)
    with open_dict(cfg):
        cfg.resume = True
    results = run(cfg)
    assert results["time/step_ms"] is not None and results["time/step_ms"] > 0


@pytest.mark.slow
def test_run_killed_by_a_signal_resumes_to_the_same_result(tmp_path):
    """The real CLI: SIGKILL after the first checkpoint, then ``resume=true``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        "run.py",
        *SHRINK,
        "finetune.epochs=3",
        "control.dense_ft=false",
        "method=prune_then_quantize",
        "method.switch_at=0.2",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    proc = subprocess.run([*base, f"hydra.run.dir={whole_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    job = subprocess.Popen([*base, f"hydra.run.dir={killed_dir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoints/compress/last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "results.json").exists()
    assert torch.load(last, weights_only=True)["global_step"] > 0

    proc = subprocess.run(
        [*base, f"hydra.run.dir={killed_dir}", "++resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole = json.loads((whole_dir / "results.json").read_text())
    resumed = json.loads((killed_dir / "results.json").read_text())
    assert comparable(resumed) == comparable(whole)
    a, b = load_file(whole_dir / "finalized.safetensors"), load_file(killed_dir / "finalized.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- failures
def test_diverged_run_raises_a_clear_error(tmp_path, shared_cache):
    cfg = compose_config([*SHRINK, "dense.lr=1e30", "dense.cache=false"], tmp_path, shared_cache)
    with pytest.raises(DivergenceError, match=r"dense reference: training diverged: loss is (nan|inf)"):
        run(cfg)


@pytest.mark.slow
def test_diverged_cli_run_exits_with_one_line_and_a_failed_record(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", *SHRINK, "dense.lr=1e30", "dense.cache=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training diverged" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "failed" and "DivergenceError: dense reference: training diverged" in record["error"]
    assert record["method"] == "slope" and record["model"] == "resnet18"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_failed_job_in_a_multirun_is_recorded_and_the_others_finish(launcher, tmp_path):
    """``method.w_bits=99,2``: the first job fails, the second still runs; both leave a
    ``results.json``. ``submitit_local`` is the code path of ``launcher=slurm``."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        f"launcher={launcher}",
        "method.w_bits=99,2",
        *SHRINK,
        "control.dense_ft=false",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    failed = json.loads((sweep / "0_slope/results.json").read_text())
    assert failed["status"] == "failed" and "method.w_bits=99" in failed["error"]
    assert failed["method"] == "slope" and failed["seed"] == 0
    done = json.loads((sweep / "1_slope/results.json").read_text())
    assert done["status"] == "ok" and done["setting"] == "2:4 w2"


# ---------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_the_same_metrics(tmp_path):
    """Three runs of one config: the first trains and caches the dense reference, the second
    loads it, the third trains it again without a cache. Same metrics, same weights."""
    overrides = [*SHRINK, "control.dense_ft=false"]
    cache = tmp_path / "cache"
    trained = run(compose_config(overrides, tmp_path / "trained", cache))
    loaded = run(compose_config(overrides, tmp_path / "loaded", cache))
    uncached = run(compose_config([*overrides, "dense.cache=false"], tmp_path / "uncached", cache))
    assert comparable(loaded) == comparable(trained)
    assert comparable(uncached) == comparable(trained)
    weights = [load_file(tmp_path / name / "run/finalized.safetensors") for name in ("trained", "loaded", "uncached")]
    assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in weights[0])


# ---------------------------------------------------------------------------- caches
def counting_trainer(calls: list, value: float = 1.0):
    def train_fn() -> Reference:
        calls.append(1)
        return Reference({"w": torch.arange(1000, dtype=torch.float32) * value}, {"top1": 0.5}, 2.0)

    return train_fn


def damage(path: Path, how: str) -> None:
    sidecar = path.with_suffix(".json")
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "byte_flip":  # still a well-formed safetensors file: only the checksum can tell
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x10
        path.write_bytes(bytes(data))
        assert load_file(path)["w"].shape == (1000,)
    elif how == "no_checksum":  # a sidecar from before checksums
        meta = json.loads(sidecar.read_text())
        del meta["sha256"]
        sidecar.write_text(json.dumps(meta))
    elif how == "no_sidecar":
        sidecar.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x80\x04not a safetensors file")


@pytest.mark.parametrize("how", ["truncated", "byte_flip", "no_checksum", "no_sidecar", "garbage"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, how):
    path = tmp_path / "dense" / "model.safetensors"
    calls: list = []
    first = cached_training(path, counting_trainer(calls))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["sha256"]) == 64 and meta["metrics"] == {"top1": 0.5}
    hit = cached_training(path, counting_trainer(calls))
    assert len(calls) == 1 and torch.equal(hit.state["w"], first.state["w"]) and hit.step_ms == 2.0

    damage(path, how)
    assert load_cached(path) is None
    rebuilt = cached_training(path, counting_trainer(calls, value=3.0))
    assert len(calls) == 2, "a damaged cache must be rebuilt, not used"
    assert torch.equal(rebuilt.state["w"], torch.arange(1000, dtype=torch.float32) * 3)
    again = load_cached(path)
    assert again is not None and torch.equal(again.state["w"], rebuilt.state["w"])


def _cache_writer(path: str, trained_dir: str, out: str) -> None:
    def train_fn() -> Reference:
        (Path(trained_dir) / f"trained-{os.getpid()}").touch()
        time.sleep(1.0)  # both processes are inside cached_training by now
        return Reference({"w": torch.full((4096,), float(os.getpid()))}, {"top1": float(os.getpid())}, None)

    ref = cached_training(Path(path), train_fn)
    Path(out).write_text(json.dumps({"w": float(ref.state["w"][0]), "top1": ref.metrics["top1"]}))


def test_two_processes_sharing_a_cache_train_once_and_leave_one_valid_file(tmp_path):
    path, trained = tmp_path / "cache" / "dense" / "model.safetensors", tmp_path / "trained"
    trained.mkdir()
    ctx = multiprocessing.get_context("fork")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_cache_writer, args=(str(path), str(trained), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert len(list(trained.iterdir())) == 1, "the second process must wait and load, not train again"
    got = [json.loads(o.read_text()) for o in outs]
    assert got[0] == got[1] and got[0]["w"] == got[0]["top1"]
    cached = load_cached(path)
    assert cached is not None and float(cached.state["w"][0]) == got[0]["w"]
    assert not list(path.parent.glob(".*.tmp")), "no temp files left behind"
