"""Bad input through the real CLI: non-zero exit, one readable line, no results.json."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# through run.py in a subprocess (~9 s each: the imports): unknown groups, one bad value, an unknown key
CASES = [
    ("method=foo", "method"),
    ("model=foo", "model"),
    ("task=foo", "task"),
    ("method.n=5", "method.n"),
    ("method.foo=1", "method.foo"),
]
# the other bad values take the same path (validate -> ConfigError -> one line): checked in this process
VALUE_CASES = [
    ("method.m=0", "method.m"),
    ("method.w_bits=9", "method.w_bits"),
    ("method.w_bits=0", "method.w_bits"),
    ("method.lam=-1", "method.lam"),
    ("method.alignment=angle", "method.alignment"),
]


@pytest.mark.parametrize("override,key", VALUE_CASES)
def test_bad_value_is_refused_before_any_work_naming_its_key(override, key, tmp_path):
    from slope_bench.errors import ConfigError
    from slope_bench.train import run
    from tests.conftest import compose_config

    cfg = compose_config([override, "logger=none", "dense.epochs=0"], tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    line = str(e.value)
    assert e.value.key in (key, key.split(".", 1)[1]) and ("expected" in line or "has" in line), line
    assert "\n" not in line and not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize("override,key", CASES)
def test_bad_input_exits_with_one_line(override, key, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "run.py",
        override,
        "logger=none",
        "dense.epochs=0",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]
    assert "expected" in lines[0] or "has" in lines[0]  # names what is allowed
    assert not list(tmp_path.rglob("results.json"))
    assert "Traceback" not in proc.stderr
