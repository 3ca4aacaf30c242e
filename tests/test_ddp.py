"""Multi-process data-parallel runs: two gloo processes on the CPU, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from slope_bench.distributed import DIGEST_ENV, broadcast_object, global_rank, process_group
from slope_bench.errors import ConfigError
from tests.conftest import ROOT, SHRINK
from tests.test_run import check_contract

DIGITS_TRAIN = 1257  # training images of the digits split


def ddp_run(tmp_path, *overrides: str, logger: str = "logger=none") -> tuple[subprocess.CompletedProcess, dict]:
    run_dir, digests = tmp_path / "run", tmp_path / "digests"
    digests.mkdir()
    shrink = [s for s in SHRINK if not s.startswith(("logger=", "task.batch_size="))]
    cmd = [
        sys.executable,
        "run.py",
        "trainer=ddp",
        *shrink,
        logger,
        "task.batch_size=128",
        *overrides,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", DIGEST_ENV: str(digests), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    ranks = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(digests.glob("rank*.jsonl"))}
    return proc, ranks


def check_ranks_agree(ranks: dict, fits: int) -> None:
    assert sorted(ranks) == ["rank0", "rank1"], "both processes must have trained"
    zero, one = ranks["rank0"], ranks["rank1"]
    assert len(zero) == len(one) == fits
    for a, b in zip(zero, one):
        assert a["world_size"] == b["world_size"] == 2
        assert a["compressor"] == b["compressor"] and a["global_step"] == b["global_step"]
        assert a["sha256"] == b["sha256"], f"{a['compressor']} state differs between the ranks"


def test_two_process_ddp_run_end_to_end(tmp_path):
    """``trainer=ddp``: 2 gloo processes run the dense reference, the dense fine-tune control
    and the compression fit together (half the steps each: the data is sharded); the weights
    and every compression tensor agree on both ranks after each fit; rank 0 alone
    finalizes, measures and writes one results.json and one W&B run."""
    proc, ranks = ddp_run(tmp_path, logger="logger=wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_ranks_agree(ranks, fits=3)
    assert [r["compressor"] for r in ranks["rank0"]] == ["Compressor", "Compressor", "Slope"]
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    check_contract(results)
    assert results["status"] == "ok" and results["setting"] == "2:4 w4"
    assert results["train/steps"] == math.ceil(math.ceil(DIGITS_TRAIN / 2) / 128) == ranks["rank0"][-1]["global_step"]
    assert len(list(tmp_path.rglob("results.json"))) == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1, "one W&B run per job"
    assert (run_dir / "rank1.log").is_file() and (run_dir / "finalized.safetensors").is_file()
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sqs", "prune_then_quantize", "codeq", "obc"])
def test_ddp_compression_state_agrees_for_stateful_methods(method, tmp_path):
    """SQS gates/masks/schedule, the sequential stage switch, CoDeQ logits, and OBC's
    post-training calibration (on rank 0) under DDP."""
    proc, ranks = ddp_run(tmp_path, f"method={method}", "control.dense_ft=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_ranks_agree(ranks, fits=1 if method == "obc" else 2)
    results = json.loads((tmp_path / "run/results.json").read_text())
    check_contract(results)
    assert results["method"] == method and results["status"] == "ok"


def test_single_process_needs_no_process_group():
    node = OmegaConf.create({"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 1, "num_nodes": 1})
    with process_group(node) as rank:
        assert rank == 0 and global_rank() == 0
        assert broadcast_object({"a": 1}) == {"a": 1}


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_strategies_that_start_processes_per_fit_are_refused(strategy):
    node = OmegaConf.create({"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 2, "strategy": strategy})
    with pytest.raises(ConfigError, match="trainer.strategy"):
        with process_group(node):
            pass
