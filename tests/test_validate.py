"""One validation pass before any work: every bad value is one line naming its key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from slope_bench.errors import ConfigError
from slope_bench.models import load_checkpoint, resnet18
from slope_bench.report import error_line, objectives
from slope_bench.train import build, run
from slope_bench.validate import check_writable, validate
from tests.conftest import ROOT, SHRINK, compose_config


@pytest.mark.parametrize(
    "overrides,key,allowed",
    [
        (["task.batch_size=abc"], "task.batch_size", "an integer"),
        (["task.batch_size=2.5"], "task.batch_size", "an integer"),
        (["seed=abc"], "seed", "0..4294967295"),
        (["seed=-1"], "seed", "0..4294967295"),
        (["seed=4294967296"], "seed", "0..4294967295"),
        (["+foo=1"], "foo", "a known top-level key"),
        (["+dense.foo=1"], "dense.foo", "a key of dense"),
        (["+method.sparsity_decay=2.0"], "method.sparsity_decay", "a knob of slope: n, m, w_bits"),
        (["method=codeq", "+method.lam=1.0"], "method.lam", "a knob of codeq: w_bits"),
        (["method.w_bits=abc"], "method.w_bits", "an integer or null"),
        (["method.compress_first=3"], "method.compress_first", "true or false"),
        (["dense.epochs=-1"], "dense.epochs", "an integer >= 0"),
        (["checkpoint_every=-1"], "checkpoint_every", "an integer >= 0"),
        (["finetune.lr=0"], "finetune.lr", "(0.0, inf)"),
        (["+objectives=[test/main]"], "objectives", "other than test/*"),
        (["model=vit_small", "+model.width=8"], "model.width", "a knob of model"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(overrides, key, allowed, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    line = str(error.value)
    assert line.startswith(f"{key}=") and allowed in line and "\n" not in line, line


def test_every_default_and_preset_config_passes(tmp_path):
    presets = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))
    for overrides in [[], ["model=vit_small"], ["model=maskrcnn"], ["model=mobilenetv3_small_100"], ["hparams_search=pareto"]] + [
        [f"experiment={p}"] for p in presets
    ]:
        validate(compose_config(overrides, tmp_path))


def test_an_unwritable_run_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^paths\.output_dir='/proc/slope_bench_test/run' is not allowed: expected a writable directory"):
        check_writable("paths.output_dir", Path("/proc/slope_bench_test/run"))
    check_writable("paths.output_dir", tmp_path / "new" / "run")  # creatable: fine
    assert not (tmp_path / "new").exists(), "the check writes nothing"


@pytest.mark.parametrize("kind", ["text_pt", "text_safetensors", "list", "other_width", "missing"])
def test_bad_checkpoints_are_one_line(kind, tmp_path):
    model = resnet18(num_classes=10, image_size=8, width=8)
    path = tmp_path / ("ckpt.safetensors" if kind == "text_safetensors" else "ckpt.pt")
    if kind.startswith("text"):
        path.write_text("not a checkpoint\n")
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "other_width":
        torch.save(resnet18(num_classes=10, image_size=8, width=4).state_dict(), path)
    with pytest.raises(ConfigError) as error:
        load_checkpoint(model, path)
    line = str(error.value)
    assert line.startswith("model.checkpoint=") and "\n" not in line
    if kind == "other_width":
        assert "conv1.weight is [4, 3, 3, 3] there, [8, 3, 3, 3] here" in line
    if kind == "list":
        assert "got list" in line


def test_checkpoint_errors_reach_the_run_as_one_line(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_text("text")
    cfg = compose_config([*SHRINK, f"model.checkpoint={path}"], tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.checkpoint="):
        build("model", cfg.model, ("dense_lr", "finetune_lr"), num_classes=10, in_chans=3, image_size=8)


def test_failure_records_keep_the_root_cause():
    try:
        try:
            raise ValueError("the real reason\nsecond line")
        except ValueError as inner:
            raise RuntimeError("Error in call to target 'x':") from inner
    except RuntimeError as outer:
        assert error_line(outer) == "ValueError: the real reason"
    try:
        try:
            raise KeyError("hidden")
        except KeyError:
            raise TypeError("shown") from None
    except TypeError as e:
        assert error_line(e) == "TypeError: shown"


def test_sweeper_objectives_read_validation_metrics(tmp_path):
    cfg = compose_config([], tmp_path)
    results = {"main_metric": "top1", "val/top1": 0.9, "test/top1": 0.1, "compress/ratio": 12.0}
    assert objectives(cfg, results) == 0.9
    with open_dict(cfg):
        cfg.objectives = ["val/main", "compress/ratio"]
    assert objectives(cfg, results) == (0.9, 12.0)


CLI_CASES = [
    (["task.batch_size=abc"], "task.batch_size"),
    (["seed=-1"], "seed"),
    (["+foo=1"], "foo"),
    (["method=codeq", "method.n=2"], "method.n"),
    (["hydra.run.dir=/proc/slope_bench_test/run"], "hydra.run.dir"),
]


@pytest.mark.parametrize("overrides,key", CLI_CASES)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(overrides, key, tmp_path):
    run_dir = [] if any(o.startswith("hydra.run.dir") for o in overrides) else [f"hydra.run.dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "run.py", *overrides, "logger=none", "dense.epochs=0", *run_dir, f"paths.cache_dir={tmp_path}/cache"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "run").exists()
    if overrides == ["method=codeq", "method.n=2"]:
        assert "codeq" in lines[0] and "sparsity_decay" in lines[0] and "lam" not in lines[0], lines[0]


@pytest.mark.slow  # two full runs; tests/test_coded.py checks byte identity across processes
def test_identical_runs_write_identical_artifacts(tmp_path, shared_cache):
    """Byte-identical finalized and packed files; results equal apart from timings; mode 0644."""
    runs = [run(compose_config([*SHRINK, "control.dense_ft=false"], tmp_path / name, shared_cache)) for name in ("a", "b")]
    for artifact in ("finalized.safetensors", "model.packed.safetensors"):
        a, b = (tmp_path / name / "run" / artifact for name in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), artifact
        assert a.stat().st_mode & 0o777 == 0o644
    untimed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in runs]
    assert untimed[0] == untimed[1]
    on_disk = [json.loads((tmp_path / n / "run/results.json").read_text()) for n in ("a", "b")]
    assert {k: v for k, v in on_disk[0].items() if not k.startswith("time/")} == {
        k: v for k, v in on_disk[1].items() if not k.startswith("time/")
    }
