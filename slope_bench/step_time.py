"""Training-step time of each method against dense, on the same model and batch.

The cost a method adds to a step is proportional to the number of targeted weights
(masks, fake quantization, penalties), while the dense step scales with the input size:
the ratio is therefore a property of (model width, input size, batch), and both are
knobs here. Every method comes from its ``conf/method/*.yaml`` exactly as ``run.py``
builds it; one step is forward, loss + ``penalty()``, backward, AdamW step and
``on_step``::

    python -m slope_bench.step_time                              # resnet18, 8x8, batch 128
    python -m slope_bench.step_time --size 32 --methods dense slope --steps 6
    python -m slope_bench.step_time --model vit_small --batch 64 --methods dense slope
    python -m slope_bench.step_time --out experiments/step_time  # + JSON/markdown record
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from slope_bench.bench import CONF_DIR, check_methods, machine
from slope_bench.models import resnet18, target_names, vit_small
from slope_bench.train import build_method

DEFAULT_METHODS = ["dense", "prune", "quantize", "naive", "slope", "codeq", "sqs", "prune_then_quantize"]


def step_ms(
    method: str, size: int, width: int, batch: int, steps: int, warmup: int = 2, seed: int = 0, model_name: str = "resnet18"
) -> float:
    """Median wall time (ms) of one training step of ``method`` (ResNet-18 at ``width``, or ViT-S)."""
    torch.manual_seed(seed)
    if model_name == "vit_small":
        model = vit_small(num_classes=10, image_size=size)
    else:
        model = resnet18(num_classes=10, width=width, image_size=size)
    node = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
    _, _, compressor = build_method(node)
    model = compressor.prepare(model, target_names(model, compressor.compress_first, compressor.compress_classifier))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    total = warmup + steps
    times = []
    for i in range(total):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y) + compressor.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        compressor.on_step(i, total)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[warmup:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--size", type=int, nargs="*", default=[8], help="input side(s) in pixels")
    parser.add_argument("--model", choices=["resnet18", "vit_small"], default="resnet18")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = standard)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (after 2 warm-up steps)")
    parser.add_argument("--out", type=Path, default=None, help="folder for step_time.json / step_time.md")
    args = parser.parse_args(argv)
    check_methods(parser, args.methods)
    if any(s < 1 for s in args.size) or args.width < 1 or args.batch < 1 or args.steps < 1:
        parser.error("--size, --width, --batch and --steps must be positive")
    methods = ["dense", *[m for m in args.methods if m != "dense"]]
    rows = []
    for size in args.size:
        dense = None
        for method in methods:
            ms = step_ms(method, size, args.width, args.batch, args.steps, model_name=args.model)
            dense = dense or ms
            rows.append({"size": size, "method": method, "step_ms": round(ms, 1), "vs_dense": round(ms / dense, 2)})
            print(f"{size:>3}px  {method:<20} {ms:8.1f} ms  {ms / dense:5.2f}x dense", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "model": f"resnet18 width {args.width}" if args.model == "resnet18" else "vit_small (384/12/6)",
            "batch": args.batch,
            "steps": args.steps,
            "rows": rows,
        }
        (args.out / "step_time.json").write_text(json.dumps(record, indent=2) + "\n")
        lines = ["| input | method | step ms | × dense |", "|---|---|---|---|"]
        lines += [f"| {r['size']}×{r['size']} | {r['method']} | {r['step_ms']} | {r['vs_dense']:.2f} |" for r in rows]
        (args.out / "step_time.md").write_text("\n".join(lines) + "\n")
        print(f"-> {args.out / 'step_time.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
