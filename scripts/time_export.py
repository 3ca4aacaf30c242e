"""Time writing and loading the packed and the coded file of a full-width ResNet-18.

Builds finalized states cheaply (no real training): each method runs through its four
hooks (:func:`slope_bench.loop.drive`) on a full-width ``resnet18`` with random 32 px
inputs, one optimizer step for the methods that train, a few random calibration images
for the post-training ones. The states are cached under ``--cache`` (``STATE.safetensors``
+ ``STATE.specs.pkl``), so later invocations only time the export.

Timed per state (medians of ``--repeats``, wall clock with the process CPU time):
``export_packed`` (encode + decode + bit-for-bit check + dense size + atomic write),
``load_packed``, ``export_coded`` (given the dense size, as the run does), ``load_coded``.
``--hash`` prints the SHA-256 of both files (for byte-identity checks across code changes);
``--profile NAME`` writes cProfile statistics (CPU time) of one write+load of each file.

Example::

    nice -n 19 .venv/bin/python scripts/time_export.py --repeats 3
    nice -n 19 .venv/bin/python scripts/time_export.py --states codeq --profile /tmp/codeq.prof
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

STATES = {  # name -> (conf/method name, overrides)
    "codeq": ("codeq", {}),
    "codeq_sparse": ("codeq", {"theta_init": 0.6}),
    "quantize": ("quantize", {}),
    "sqs": ("sqs", {}),
    "slope": ("slope", {}),
    "obc": ("obc", {"solver": "magnitude", "n_calib": 16, "progress": False, "bn_recalib": False}),
    "slope_1_4_w2": ("slope", {"n": 1, "w_bits": 2}),
}


def build_state(name: str, num_classes: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Finalized ``(state, specs)`` of ``STATES[name]`` on a full-width resnet18."""
    from omegaconf import OmegaConf

    from slope_bench.export import positive_zeros
    from slope_bench.loop import drive
    from slope_bench.methods.base import RunInfo
    from slope_bench.models import resnet18
    from slope_bench.train import METHOD_SEARCH, build
    from slope_bench.utils import CONF_DIR

    method, overrides = STATES[name]
    torch.manual_seed(seed)
    model = resnet18(num_classes=num_classes, in_chans=3, image_size=32, width=64)
    conf = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    for key, value in overrides.items():
        conf[key] = value
    compressor = build("method", conf, METHOD_SEARCH)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, num_classes, (4,)))

    def calib(samples: int, passes: int) -> list[torch.Tensor]:
        return [torch.randn(min(samples, 16), 3, 32, 32)] * passes

    driven = drive(
        model,
        compressor,
        [batch],
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        steps=1,
        info=RunInfo(num_train=1024, seed=seed),
        calib=calib,
    )
    specs = driven.finalized.specs
    state = {k: positive_zeros(v) if k.removesuffix(".weight") in specs else v for k, v in model.state_dict().items()}
    return state, specs


def load_or_build(name: str, cache: Path, num_classes: int) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file, save_file

    tensors, specs_path = cache / f"{name}.safetensors", cache / f"{name}.specs.pkl"
    if tensors.is_file() and specs_path.is_file():
        order = pickle.loads(specs_path.read_bytes())
        loaded = load_file(str(tensors))
        return {k: loaded[k] for k in order["keys"]}, order["specs"]
    state, specs = build_state(name, num_classes)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tensors))
    specs_path.write_bytes(pickle.dumps({"keys": list(state), "specs": specs}))
    return state, specs


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` calls, and its last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def describe(state: dict[str, torch.Tensor], specs: dict) -> str:
    weights = [state[f"{k}.weight"] for k in specs]
    numel = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return f"{len(specs)} targeted, {numel / 1e6:.2f} M weights, sparsity {zeros / max(numel, 1):.3f}"


def time_state(name: str, state: dict[str, torch.Tensor], specs: dict, out: Path, args: argparse.Namespace) -> str | None:
    """Profile, or time and print, one state's four operations; returns its table row."""
    from slope_bench.coded import CODED_NAME, export_coded, load_coded
    from slope_bench.export import PACKED_NAME, export_packed, load_packed, same_bits

    if args.profile is not None:
        import cProfile

        for label, fn in (
            ("packed_write", lambda: export_packed(state, specs, out)),
            ("packed_load", lambda: load_packed(out / PACKED_NAME)),
            ("coded_write", lambda: export_coded(state, specs, out, dense_bytes=1)),
            ("coded_load", lambda: load_coded(out / CODED_NAME)),
        ):
            profile = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
            profile.runcall(fn)
            profile.dump_stats(f"{args.profile}.{name}.{label}")
        return None
    pw = timed(lambda: export_packed(state, specs, out), args.repeats)
    dense = pw[2]["compress/dense_bytes"]
    pl = timed(lambda: load_packed(out / PACKED_NAME), args.repeats)
    cw = timed(lambda: export_coded(state, specs, out, dense_bytes=dense), args.repeats)
    cl = timed(lambda: load_coded(out / CODED_NAME), args.repeats)
    for loaded in (pl[2], cl[2]):
        assert list(loaded) == list(state) and all(same_bits(loaded[k], state[k]) for k in state)
    sizes = [(out / PACKED_NAME).stat().st_size, (out / CODED_NAME).stat().st_size]
    cells = [f"{w:.2f} s ({c:.2f})" for w, c, _ in (pw, pl, cw, cl)]
    row = f"{name} | " + " | ".join(cells) + f" | {sizes[0]:,} | {sizes[1]:,}"
    print(row, f"| load avg {os.getloadavg()[0]:.1f}", flush=True)
    if args.hash:
        for label in (PACKED_NAME, CODED_NAME):
            print(f"  {label} sha256 {hashlib.sha256((out / label).read_bytes()).hexdigest()}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--states", nargs="+", default=list(STATES), choices=list(STATES))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "slope_bench_time_export")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hash", action="store_true", help="print the SHA-256 of both files")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats to PROFILE.<state>.<file>")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    header = "state | packed write | packed load | coded write | coded load | packed B | coded B"
    rows = []
    for name in args.states:
        state, specs = load_or_build(name, args.cache, args.num_classes)
        print(f"{name}: {describe(state, specs)}", flush=True)
        if args.build_only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = time_state(name, state, specs, Path(tmp), args)
        if row:
            rows.append(row)
    if rows:
        print("\n" + header + "\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
