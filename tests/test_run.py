"""``run(cfg)`` end to end for every method on resnet18/digits (shrunk), and the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from slope_bench.references import config_id
from slope_bench.train import run
from tests.conftest import METHODS, MODELS, ROOT, RUN_SHRINK, SHRINK, model_overrides

CONTRACT = [
    "method", "model", "task", "seed", "setting",
    "test/retention",
    "compress/ratio", "compress/ratio_nominal", "compress/bits_per_weight", "compress/sparsity",
    "compress/bops", "compress/bops_ratio",
    "compress/packed_bytes", "compress/dense_bytes", "compress/measured_ratio",
    "time/fit_s", "time/step_ms", "time/step_ms_dense", "layers", "config_id", "method_config",
]  # fmt: skip
LAYER_KEYS = ["name", "shape", "pattern", "w_bits", "granularity", "sparsity", "levels", "sqnr_db"]


def check_contract(results: dict) -> None:  # noqa: D103
    main = results["main_metric"]
    missing = [k for k in [*CONTRACT, f"test/{main}", f"test/{main}_dense", f"test/{main}_dense_ft"] if k not in results]
    assert not missing, f"results.json lacks {missing}"
    assert 0 <= results[f"test/{main}"] <= 1 and 0 <= results[f"test/{main}_dense"] <= 1
    if results[f"test/{main}_dense"]:
        assert results["test/retention"] == pytest.approx(results[f"test/{main}"] / results[f"test/{main}_dense"])
    assert results["layers"], "no per-layer records"
    assert results["method_config"]["name"] == results["method"] and "_target_" not in results["method_config"]
    for layer in results["layers"]:
        assert all(k in layer for k in LAYER_KEYS), layer


@pytest.mark.parametrize("method", METHODS)
def test_run_every_method_end_to_end(method, make_cfg):
    cfg = make_cfg(f"method={method}")
    results = run(cfg)
    check_contract(results)
    assert results["method"] == method and results["model"] == "resnet18" and results["task"] == "digits"
    out = cfg.paths.output_dir
    on_disk = json.loads((__import__("pathlib").Path(out) / "results.json").read_text())
    assert on_disk["compress/ratio"] == pytest.approx(results["compress/ratio"])
    state = load_file(f"{out}/finalized.safetensors")
    for layer in results["layers"]:
        w = state[f"{layer['name']}.weight"]
        assert float((w == 0).double().mean()) == pytest.approx(layer["sparsity"], abs=1e-9)
    # the packed artifact loads back into exactly the finalized weights, at the accounted size
    from slope_bench.export import load_packed, verify

    assert verify(out) == 0
    unpacked = load_packed(f"{out}/model.packed.safetensors")
    assert all(
        torch.equal(
            unpacked[k].view(torch.int32) if v.dtype == torch.float32 else unpacked[k],
            v.view(torch.int32) if v.dtype == torch.float32 else v,
        )
        for k, v in state.items()
    )
    assert results["compress/measured_ratio"] == pytest.approx(results["compress/dense_bytes"] / results["compress/packed_bytes"])
    if results["train/epochs"] > 0:  # the control had exactly the compression run's budget
        assert results["train/steps_dense_ft"] == results["train/steps"] > 0
    if method != "dense":
        assert results["compress/measured_ratio"] > 1.5
        assert results["compress/ratio"] > 1.5
        assert results["compress/bops_ratio"] < 1.0


def test_slope_default_setting_and_dense_cache_reuse(make_cfg, tmp_path):
    own_cache = tmp_path / "own_cache"
    cfg = make_cfg(cache=own_cache)
    first = run(cfg)
    assert first["setting"] == "2:4 w4"
    assert all(layer["pattern"] == "2:4" for layer in first["layers"])
    assert max(layer["w_bits"] for layer in first["layers"]) <= 4
    cache_files = list((__import__("pathlib").Path(cfg.paths.cache_dir) / "dense").glob("*.safetensors"))
    assert len(cache_files) == 1
    stamp = cache_files[0].stat().st_mtime_ns
    second = run(make_cfg("method=naive", cache=own_cache))
    assert second["test/top1_dense"] == first["test/top1_dense"]
    assert cache_files[0].stat().st_mtime_ns == stamp, "the dense reference must be reused, not retrained"


def test_cli_default_job(tmp_path):
    """The real ``python run.py`` writes results.json in its Hydra run dir."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", *SHRINK, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    check_contract(results)
    assert "retention" in proc.stdout
    assert (run_dir / "finalized.safetensors").is_file()


def test_cli_wandb_offline_run(tmp_path):
    """The default logger (W&B, offline) records the run locally without an API key."""
    run_dir = tmp_path / "run"
    shrink = [s for s in SHRINK if not s.startswith("logger=")]
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [sys.executable, "run.py", *shrink, "method=quantize", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run written"
    console = proc.stdout + proc.stderr
    for noise in ("anonymous setting", "GPU available", "TPU available", "💡 Tip", "validation_step", "deprecated"):
        assert noise not in console, noise  # third-party noise that says nothing about the run
    assert torch.tensor(json.loads((run_dir / "results.json").read_text())["compress/ratio"]) > 1


def test_config_id_names_the_configuration_not_the_seed(make_cfg, tmp_path):
    base = config_id(make_cfg("method=codeq"))
    assert config_id(make_cfg("method=codeq", "seed=3")) == base  # seeds of one configuration
    assert config_id(make_cfg("method=codeq", cache=tmp_path)) == base  # where files go does not matter
    assert config_id(make_cfg("method=codeq", "method.sparsity_decay=1.0")) != base  # a knob the setting name hides
    assert config_id(make_cfg("method=codeq", "finetune.epochs=2")) != base  # the budget


@pytest.mark.parametrize("model_name", MODELS)
def test_cli_end_to_end_on_every_model(model_name, tmp_path):
    """The real ``python run.py model=<name>`` on the model's default task, shrunk: every
    conf/model/*.yaml (a new model yaml is picked up with no other edit)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", *RUN_SHRINK, *model_overrides(model_name), f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/c"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    check_contract(results)
    assert results["model"] == model_name and results["setting"] == "2:4 w4"
    assert results["compress/ratio"] > 1.5
