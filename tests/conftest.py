"""Shared fixtures: compose the real Hydra configs, shrunk for a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

# A tiny but real run: resnet18 at width 8 on digits, one epoch each.
SHRINK = [
    "model.width=8",
    "dense.epochs=1",
    "finetune.epochs=1",
    "task.batch_size=256",
    "val_every=0",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def compose_config(overrides: list[str], out: Path, cache: Path | None = None) -> DictConfig:
    """The real config tree with ``overrides``, writing under ``out``."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
        cfg.paths.output_dir = str(out / "run")
        cfg.paths.data_dir = str(out / "data")
        cfg.paths.cache_dir = str(cache or out / "cache")
    return cfg


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One dense-reference cache for the whole session (trained once)."""
    return tmp_path_factory.mktemp("dense_cache")


@pytest.fixture
def make_cfg(tmp_path, shared_cache):
    def _make(*overrides: str, shrink: bool = True, cache: Path | None = None) -> DictConfig:
        return compose_config([*(SHRINK if shrink else []), *overrides], tmp_path, cache or shared_cache)

    return _make
