"""Training-step time of each method against dense, on the same model and batch.

The cost a method adds to a step is proportional to the number of targeted weights
(masks, fake quantization, penalties), while the dense step scales with the input size:
the ratio is therefore a property of (model, width, input size, batch), and all are
knobs here. Every method comes from its ``conf/method/*.yaml`` and every model from its
``conf/model/*.yaml`` exactly as ``run.py`` builds them; one step is forward, loss +
``penalty()``, backward, AdamW step and ``on_step`` (:func:`slope_bench.loop.drive`)::

    python -m slope_bench.step_time                              # resnet18, 8x8, batch 128
    python -m slope_bench.step_time --size 32 --methods dense slope --steps 6
    python -m slope_bench.step_time --model vit_small --batch 64 --methods dense slope
    python -m slope_bench.step_time --out experiments/step_time  # + JSON/markdown record
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from slope_bench.bench import CONF_DIR, check_names, machine
from slope_bench.loop import drive
from slope_bench.methods.base import RunInfo
from slope_bench.train import method_from_yaml

DEFAULT_METHODS = ["dense", "prune", "quantize", "naive", "slope", "codeq", "sqs", "prune_then_quantize"]
NUM_CLASSES = 10
NUM_TRAIN = 1437  # the digits training split: what a default run tells SQS's KL weight


def build_model(model_name: str, size: int, width: int | None = None) -> torch.nn.Module:
    """A ``conf/model/<model_name>.yaml`` classifier for ``size``-pixel RGB inputs."""
    node = OmegaConf.load(CONF_DIR / "model" / f"{model_name}.yaml")
    node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(node).items() if k not in ("defaults", "dense_lr", "finetune_lr")})
    if width is not None and "width" in node:
        node.width = width
    return hydra.utils.instantiate(node, num_classes=NUM_CLASSES, in_chans=3, image_size=size)


PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def step_ms(
    method: str,
    size: int,
    width: int | None,
    batch: int,
    steps: int,
    warmup: int = 2,
    seed: int = 0,
    model_name: str = "resnet18",
    device: str = "cpu",
    precision: str = "32-true",
) -> float | None:
    """Median wall time (ms) of one training step of ``method`` (None: a post-training method).

    ``precision`` ``bf16-mixed`` / ``16-mixed`` runs the forward under autocast (weights,
    quantizer steps and gates stay fp32), as ``trainer.precision`` does in a run.
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = build_model(model_name, size, width).to(dev)
    compressor = method_from_yaml(method)
    if not compressor.requirements.trains:
        return None
    data = [(torch.randn(batch, 3, size, size, device=dev), torch.randint(0, NUM_CLASSES, (batch,), device=dev))]
    dtype = PRECISIONS[precision]

    def loss_fn(m, b):
        if dev.type == "cuda":
            torch.cuda.synchronize()  # the previous step's kernels finish inside its own interval
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return F.cross_entropy(m(b[0]), b[1])

    driven = drive(
        model,
        compressor,
        data,
        loss_fn,
        steps=warmup + steps,
        info=RunInfo(num_train=NUM_TRAIN, seed=seed),
        lr=1e-4,
        finalize=False,
    )
    return 1000 * statistics.median(driven.step_seconds[warmup:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--size", type=int, nargs="*", default=[8], help="input side(s) in pixels")
    parser.add_argument("--model", default="resnet18", help="a conf/model/*.yaml classifier")
    parser.add_argument("--width", type=int, default=64, help="model.width where the model has it (ResNet-18: 64 = standard)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (after 2 warm-up steps)")
    parser.add_argument("--out", type=Path, default=None, help="folder for step_time.json / step_time.md")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=list(PRECISIONS))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    check_names(parser, "method", args.methods)
    check_names(parser, "model", [args.model])
    if args.model == "maskrcnn":
        parser.error("--model maskrcnn: step_time times classifiers (detection steps need targets)")
    if any(s < 1 for s in args.size) or args.width < 1 or args.batch < 1 or args.steps < 1:
        parser.error("--size, --width, --batch and --steps must be positive")
    methods = ["dense", *[m for m in args.methods if m != "dense"]]
    rows = []
    for size in args.size:
        dense = None
        for method in methods:
            ms = step_ms(
                method, size, args.width, args.batch, args.steps, model_name=args.model, device=args.device, precision=args.precision
            )
            if ms is None:
                print(f"{size:>3}px  {method:<20} post-training: no training steps", flush=True)
                continue
            dense = dense or ms
            rows.append({"size": size, "method": method, "step_ms": round(ms, 1), "vs_dense": round(ms / dense, 2)})
            print(f"{size:>3}px  {method:<20} {ms:8.1f} ms  {ms / dense:5.2f}x dense", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "threads": torch.get_num_threads(),
            "device": args.device,
            "precision": args.precision,
            "model": f"{args.model} width {args.width}" if args.model == "resnet18" else args.model,
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
