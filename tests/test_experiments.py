"""Every ``experiment=`` preset composes and runs on the embedded task (fast_dev_run)."""

from __future__ import annotations

import pytest

from slope_bench.train import run
from tests.conftest import CONF

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_on_embedded_task(preset, make_cfg):
    cfg = make_cfg(f"experiment={preset}", "task=digits", "model.pretrained=false", "trainer.fast_dev_run=true", "logger=none")
    results = run(cfg)
    assert results["status"] == "ok"
    assert results["method"] == cfg.method.name
    paper = cfg.get("paper") or {}
    for key, value in paper.items():
        assert results[f"paper/{key}"] == value
    if preset != "bench_digits":
        assert paper, f"{preset} should name the paper's published figures"
