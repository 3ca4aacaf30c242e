"""Model-level paper checks: OBC layer-wise (Frantar et al.) and SLOPE's alignment term,
plus the layers they run on: a finished run's dense reference (``--run``) or, by default,
a narrow ResNet-18 trained briefly on the embedded digits task."""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from slope_bench.calibration import collect_hessians
from slope_bench.errors import ConfigError
from slope_bench.loop import drive
from slope_bench.methods.slope import Slope, row_cosine
from slope_bench.models import choose_targets, resnet18, target_names
from slope_bench.obs import reconstruction_error, solve_layer
from slope_bench.quant import UniformGrid
from slope_bench.sparsity import NM, as_matrix, nm_mask


class AnalysisError(ValueError):
    """Bad input to a check: one line naming the argument."""


@dataclass
class Setup:
    """A dense model, its task, the layers to analyse and where they come from."""

    model: nn.Module
    task: object
    layers: list[str]
    source: str
    width: int | None = None


@functools.lru_cache(maxsize=2)
def default_setup(width: int = 8, steps: int = 150, seed: int = 0) -> Setup:
    """ResNet-18 of base width ``width`` (3×3 stem) trained ``steps`` AdamW steps on digits 8×8
    (cached per process: the checks only read it, the alignment check fine-tunes copies)."""
    from slope_bench.tasks.digits import Digits

    torch.manual_seed(seed)
    task = Digits(resolution=8, augment=False, seed=seed)
    task.setup()
    model = resnet18(num_classes=10, image_size=8, width=width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    model.train()
    done = 0
    while done < steps:
        for batch in task.train_dataloader():
            loss = task.loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    acc = task.evaluate(model, "val")["top1"]
    source = f"ResNet-18 width {width} trained {steps} steps on digits 8×8 here (val top-1 {acc:.3f}); not a run's dense reference"
    return Setup(model, task, target_names(model), source, width)


def run_setup(run_dir: Path) -> Setup:
    """The dense reference of a finished run: its model rebuilt from ``.hydra/config.yaml``
    (the config Hydra saves for ``run.py``) with the cached dense weights, its task (the
    same data, splits and calibration batches: built with the run's seed), and the layers
    the run compressed (``results.json``'s ``layers``, in order).

    Raises:
        AnalysisError: naming ``--run`` when ``results.json`` or the config is missing or
            unreadable, the dense reference is not in the cache, the model or task cannot
            be rebuilt, or ``results.json`` names no layer of the model.
    """
    import json

    from slope_bench import references
    from slope_bench.train import MODEL_RECIPE, build

    def fail(why: str) -> AnalysisError:
        return AnalysisError(f"--run {run_dir}: {why}")

    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise fail("no results.json (not a finished run directory)")
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as e:
        raise fail(f"results.json is unreadable ({_first_line(e)})") from None
    if not isinstance(results, dict):
        raise fail("results.json is not a JSON object")
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise fail("no .hydra/config.yaml (the config run.py saves; the dense reference is found from it)")
    try:
        cfg = OmegaConf.load(config)
        hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
        cwd = OmegaConf.load(hydra_yaml).hydra.runtime.get("cwd") if hydra_yaml.is_file() else None
        try:
            OmegaConf.resolve(cfg)
        except Exception:  # ${hydra:...} interpolations outside Hydra: root at the run's cwd
            cfg.paths.root_dir = cwd or str(Path.cwd())
            cfg.paths.output_dir = str(run_dir)
            cfg.paths.log_dir = str(run_dir.parent)
            OmegaConf.resolve(cfg)
        path = references.cache_path(cfg, "dense", references.dense_key(cfg))
    except Exception as e:  # noqa: BLE001 - any unreadable config is one line
        raise fail(f".hydra/config.yaml is unreadable ({_first_line(e)})") from None
    if path is None:
        raise fail("no cached dense reference (the run had dense.cache=false)")
    dense = references.load_cached(path)
    if dense is None:
        raise fail(f"no cached dense reference ({path})")
    try:
        task = build("task", cfg.task, seed=cfg.seed)
        task.setup()
        model = build("model", cfg.model, MODEL_RECIPE, num_classes=task.num_classes, in_chans=task.in_chans, image_size=task.image_size)
        model.load_state_dict(dense.state)
    except Exception as e:  # noqa: BLE001 - a model or task that cannot be rebuilt here is one line
        raise fail(f"cannot rebuild the run's model and task ({_first_line(e)})") from None
    model.eval()
    modules = dict(model.named_modules())
    named = [r.get("name") for r in results.get("layers") or [] if isinstance(r, dict)]
    layers = [n for n in named if n in modules and getattr(modules[n], "weight", None) is not None]
    missing = [n for n in named if n not in layers]
    if missing:
        raise fail(f"results.json names layers the model does not have ({', '.join(map(str, missing[:3]))})")
    if not layers:
        raise fail(f"results.json lists no compressed layer (status: {results.get('status', 'ok')})")
    return Setup(
        model, task, layers, f"dense reference of {run_dir} ({cfg.model.name} on {cfg.task.name}, {len(layers)} compressed layers)"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def layer_weights(setup: Setup) -> dict[str, torch.Tensor]:
    return {n: setup.model.get_submodule(n).weight.detach().clone() for n in setup.layers}


# ---- OBC layer-wise -------------------------------------------------------------------------
OBC_SETTINGS = {"2:4": (NM(2, 4), None), "4-bit": (None, UniformGrid(4)), "2:4+4-bit": (NM(2, 4), UniformGrid(4))}
BLOCKED_FACTOR = 1.5  # claim checked: blocked error <= this × exact error


def obc_rows(setup: Setup, calib_samples: int = 256, max_cols: int = 600) -> tuple[list[dict], list[str]]:
    """Relative layer error ``‖WX − ŴX‖²/‖WX‖²`` (:func:`slope_bench.obs.reconstruction_error`)
    of magnitude+RTN (grid min-max on the kept weights), sequential magnitude→RTN (grid by
    the MSE clipping search), OBC exact and OBC blocked (MSE grid), with real calibration
    inputs; layers with more than ``max_cols`` input columns are skipped (exact OBC is
    ``O(rows·d³)``)."""
    calib = setup.task.calib_batches(calib_samples)
    hessians = collect_hessians(setup.model, setup.layers, calib)
    rows, skipped = [], []
    for name in setup.layers:
        w = as_matrix(setup.model.get_submodule(name).weight.detach()).double()
        if w.shape[1] > max_cols:
            skipped.append(f"{name} ({w.shape[0]}×{w.shape[1]})")
            continue
        h = hessians[name]
        for setting, (pattern, grid) in OBC_SETTINGS.items():
            if pattern is not None and not pattern.applies_to(w):
                continue
            row = {"layer": name, "shape": f"{w.shape[0]}x{w.shape[1]}", "setting": setting}
            runs = {
                "magnitude_rtn": ("magnitude", "minmax"),
                "sequential": ("magnitude", "mse"),
                "obc_exact": ("exact", "mse"),
                "obc_blocked": ("blocked", "mse"),
            }
            for key, (solver, range_) in runs.items():
                start = time.perf_counter()
                sol = solve_layer(w, h, pattern, None, grid, solver=solver, range_=range_)
                row[f"{key}_s"] = time.perf_counter() - start
                row[key] = reconstruction_error(w, sol.weight, h)
            best_baseline = min(row["magnitude_rtn"], row["sequential"])
            row["obc_beats_baseline"] = row["obc_exact"] <= best_baseline * (1 + 1e-9)
            row["blocked_over_exact"] = row["obc_blocked"] / max(row["obc_exact"], 1e-300)
            rows.append(row)
    return rows, skipped


# ---- SLOPE alignment ------------------------------------------------------------------------
ALIGNMENT_MODES = ("cosine", "l2", "none")


def cosine_identity_error(layers: dict[str, torch.Tensor]) -> float:
    """Largest ``|cos(w_i, m⊙w_i) − ‖m⊙w_i‖/‖w_i‖|`` over the rows of every layer, ``m`` the
    magnitude 2:4 mask (:func:`nm_mask`), cosine by :func:`row_cosine`."""
    worst = 0.0
    for w in layers.values():
        if not NM(2, 4).applies_to(w):
            continue
        a = as_matrix(w).double()
        b = as_matrix(w * nm_mask(w, NM(2, 4))).double()
        cos = row_cosine(a, b)
        worst = max(worst, float((cos - b.norm(dim=1) / a.norm(dim=1)).abs().max()))
    return worst


def alignment_rows(setup: Setup, steps: int = 40, seed: int = 0, lr: float = 5e-4) -> list[dict]:
    """Fine-tune a copy of the dense model with SLOPE (2:4, 4 bits) for ``steps`` steps with
    ``alignment`` cosine, l2 and none (same seed, batches and budget, via :func:`drive`);
    per layer the mean row cosine of the latent ``W`` and the finalized ``Ŵ``, and val top-1."""
    loader = setup.task.train_dataloader()
    torch.manual_seed(seed)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) >= steps:
            break
    rows = []
    # the setup's first layer / classifier are compressed too when it lists them (a run's own choice)
    first = bool(set(getattr(setup.model, "first_layers", ())) & set(setup.layers))
    classifier = bool(set(getattr(setup.model, "classifier_layers", ())) & set(setup.layers))
    try:
        applies = set(choose_targets(setup.model, Slope(compress_first=first, compress_classifier=classifier))[0])
    except ConfigError:  # SLOPE's 2:4 applies to no layer of the model
        applies = set()
    if not applies & set(setup.layers):
        return []
    for mode in ALIGNMENT_MODES:
        torch.manual_seed(seed)
        model = copy.deepcopy(setup.model)
        compressor = Slope(alignment=mode, compress_first=first, compress_classifier=classifier)
        driven = drive(model, compressor, batches, setup.task.loss, steps=steps, lr=lr, finalize=False)
        latent = {n: model.get_submodule(n).parametrizations.weight.original.detach().clone() for n in driven.targets}
        compressor.finalize(model, None)
        model.eval()
        top1 = setup.task.evaluate(model, "val")["top1"]
        for name in [n for n in setup.layers if n in latent]:  # the setup's layers SLOPE (2:4) applies to, in order
            w_hat = model.get_submodule(name).weight.detach()
            cos = row_cosine(as_matrix(latent[name]).double(), as_matrix(w_hat).double())
            rows.append({"alignment": mode, "layer": name, "cosine": float(cos.mean()), "val_top1": top1, "steps": steps})
    return rows
