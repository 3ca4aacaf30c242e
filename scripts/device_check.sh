#!/usr/bin/env bash
# Device check (issue 20 §4): the GPU code paths at the papers' shapes, on synthetic data,
# sized to at most 8 minutes on one H200. From the repository root:
#
#   bash scripts/device_check.sh                 # on the GPU machine; writes experiments/gpu/<device>.md
#   DRY=1 bash scripts/device_check.sh           # every step tiny, on the CPU, under /tmp (< 2 min)
#   PY=/path/to/python bash scripts/device_check.sh   # another interpreter (default .venv/bin/python)
#
# Steps (each under its own timeout; a failed or timed-out step is recorded and the
# others still run; the exit status is 1 when any step failed):
#   1. step time of dense / slope / naive / codeq / sqs on ResNet-18, 224 px, batch 256,
#      bf16 autocast, ratio to dense. `python -m slope_bench.step_time --device cuda
#      --precision ...` is used (it has both flags now); the inline drive() loop under bf16
#      autocast remains as the fallback for a checkout whose step_time lacks them.
#   2. OBC (conf/method/obc.yaml: 2:4 + w4) on every targeted ResNet-18 layer with 1,024
#      random 224 px calibration images, on the device (wall time of prepare + calibration
#      + solve); the finalized model is written as a run directory (packed artifact).
#      If OBC fails, magnitude_rtn 2:4 w4 makes the run so that step 3 still runs.
#   3. python -m slope_bench.deploy on that 2:4 w4 run at batch 1 and 256.
#   4. the record: experiments/gpu/<device name>.md (date, machine, every figure).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DRY=${DRY:-0}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline

if [[ "$DRY" == "1" ]]; then
    export CHECK_DEVICE=cpu CHECK_SIZE=32 CHECK_BATCH=8 CHECK_STEPS=2 CHECK_WIDTH=8 CHECK_CALIB=32 CHECK_CALIB_BATCH=16
    export CHECK_DEPLOY_BATCHES="1 4" CHECK_REPEATS=2 CHECK_WORK=${WORK:-/tmp/device_check_dry}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a small shared CPU: two threads spin against other jobs
    RECORD_DIR=$CHECK_WORK/gpu
    T_STEPS=60 T_OBC=60 T_DEPLOY=60
else
    export CHECK_DEVICE=cuda CHECK_SIZE=224 CHECK_BATCH=256 CHECK_STEPS=10 CHECK_WIDTH=64 CHECK_CALIB=1024 CHECK_CALIB_BATCH=128
    export CHECK_DEPLOY_BATCHES="1 256" CHECK_REPEATS=10 CHECK_WORK=${WORK:-/tmp/device_check}
    RECORD_DIR=$ROOT/experiments/gpu
    T_STEPS=150 T_OBC=210 T_DEPLOY=90  # 450 s of steps + start-up and the record: under 8 minutes
fi
export CHECK_METHODS="dense slope naive codeq sqs"
export CHECK_RECORD_DIR=$RECORD_DIR CHECK_DRY=$DRY
[[ -x "$PY" ]] || { echo "device_check: PY=$PY is not an executable python (make the venv, or set PY=...)" >&2; exit 2; }
if [[ "$DRY" != "1" ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_check: no CUDA device visible to $PY (DRY=1 runs the CPU dry run)" >&2
    exit 2
fi
if [[ -d "$CHECK_WORK" && -n "$(ls -A "$CHECK_WORK")" && ! -f "$CHECK_WORK/steps.tsv" ]]; then
    echo "device_check: WORK=$CHECK_WORK exists and is not an earlier check's folder; choose another WORK" >&2
    exit 2
fi
rm -rf "$CHECK_WORK"
mkdir -p "$CHECK_WORK" "$RECORD_DIR"
: > "$CHECK_WORK/steps.tsv"
START=$(date +%s)

# run_step NAME TIMEOUT CMD... : run under a timeout, log to $CHECK_WORK/NAME.log, record status and wall time
run_step() {
    local name=$1 limit=$2 t0 rc=0
    shift 2
    t0=$(date +%s.%N)
    echo "== $name (timeout ${limit}s)"
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$CHECK_WORK/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    local wall
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    local status=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timed out"; elif [[ $rc -ne 0 ]]; then status="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$wall" "$limit" >> "$CHECK_WORK/steps.tsv"
    echo "== $name: $status in ${wall}s"
}

cat > "$CHECK_WORK/check.py" <<'PYEOF'
"""The steps of scripts/device_check.sh (parameters from CHECK_* environment variables)."""

import json
import os
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

E = os.environ
WORK = Path(E["CHECK_WORK"])
DEVICE, SIZE, BATCH = E["CHECK_DEVICE"], int(E["CHECK_SIZE"]), int(E["CHECK_BATCH"])
STEPS, WIDTH, CALIB, CALIB_BATCH = int(E["CHECK_STEPS"]), int(E["CHECK_WIDTH"]), int(E["CHECK_CALIB"]), int(E["CHECK_CALIB_BATCH"])
METHODS = E["CHECK_METHODS"].split()
RUN = WORK / "run_2of4_w4"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def machine():
    from slope_bench.bench import machine as info

    out = info()
    out["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else out["cpu"]
    out["threads"] = torch.get_num_threads()
    try:
        out["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = None
    out["cuda"] = torch.version.cuda
    (WORK / "machine.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def steps():
    """Median step time per method under bf16 autocast on the device (drive(): forward,
    loss + penalty, backward, AdamW, on_step), 2 warm-up steps."""
    import hydra
    import torch.nn.functional as F

    from slope_bench.bench import CONF_DIR
    from slope_bench.loop import drive
    from slope_bench.methods.base import RunInfo
    from slope_bench.step_time import NUM_CLASSES, NUM_TRAIN, build_model
    from slope_bench.train import method_from_yaml

    torch.backends.cudnn.benchmark = True
    rows, dense = [], None
    for method in METHODS:
        row = {"method": method}
        try:
            torch.manual_seed(0)
            model = build_model("resnet18", SIZE, WIDTH).to(DEVICE)
            compressor = method_from_yaml(method)
            data = [(torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE), torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE))]

            def loss_fn(m, b):
                sync()  # the previous step's kernels finish inside this step's interval
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    return F.cross_entropy(m(b[0]), b[1])

            driven = drive(model, compressor, data, loss_fn, steps=2 + STEPS, info=RunInfo(num_train=NUM_TRAIN), lr=1e-4, finalize=False)
            sync()
            row["step_ms"] = 1000 * statistics.median(driven.step_seconds[2:])
            dense = dense or (row["step_ms"] if method == "dense" else None)
            row["vs_dense"] = row["step_ms"] / dense if dense else None
            if DEVICE == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            print(f"{method:<8} {row['step_ms']:9.1f} ms  {row['vs_dense'] or float('nan'):5.2f}x dense", flush=True)
        except Exception as e:  # noqa: BLE001 - one method failing is recorded; the others still run
            while e.__cause__ is not None:  # hydra wraps the method's own error
                e = e.__cause__
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"{method:<8} FAILED {row['error']}", flush=True)
        rows.append(row)
        model = compressor = data = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    (WORK / "step_time.json").write_text(json.dumps({"path": "inline drive() + bf16 autocast", "rows": rows}, indent=2))
    if any("error" in r for r in rows):
        sys.exit(1)


def obc(method="obc"):
    """OBC (2:4 w4) on every targeted layer with CALIB random images; writes the run directory."""
    from slope_bench.deploy import synthetic_run

    overrides = {"n_calib": CALIB} if method == "obc" else {}
    results = synthetic_run(
        RUN, "resnet18", method, image_size=SIZE, num_classes=1000 if SIZE >= 224 else 10, model_overrides={"width": WIDTH},
        method_overrides=overrides, steps=0, batch=4, calib_batch=CALIB_BATCH, device=DEVICE,
    )  # fmt: skip
    keep = {k: v for k, v in results.items() if k != "layers"}
    keep["solvers"] = sorted({str(r.get("solver")) for r in results["layers"] if "solver" in r})
    (WORK / f"{method}.json").write_text(json.dumps(keep, indent=2, default=str))


def fallback():
    """When OBC failed: the same 2:4 w4 shapes from magnitude_rtn, so that deploy still runs."""
    if (RUN / "results.json").is_file():
        print("OBC wrote the run; no fallback needed")
        return
    obc("magnitude_rtn")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def fmt(value, spec=".1f"):
    return "—" if value is None else format(value, spec)


def last_line(step):
    path = WORK / f"{step}.log"
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    return (lines[-1][:200] if lines else "").replace("|", "/")


def report():
    m = json.loads((WORK / "machine.json").read_text()) if (WORK / "machine.json").is_file() else {"device": "unknown"}
    steps_tsv = [line.split("\t") for line in (WORK / "steps.tsv").read_text().splitlines() if line]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dry = E.get("CHECK_DRY") == "1"
    lines = [
        f"# Device check: {m.get('device')}" + (" (DRY RUN: tiny sizes on the CPU)" if dry else ""),
        "",
        f"`bash scripts/device_check.sh`{' with DRY=1' if dry else ''}, {when}. Synthetic data (random images and labels).",
        "",
        f"* **Machine:** {m.get('device')} ({m.get('nvidia_smi') or 'no nvidia-smi'}); CPU {m.get('cpu')}, {m.get('cores')} cores; "
        f"torch {m.get('torch')} (CUDA {m.get('cuda')}), python {m.get('python')}; {m.get('platform')}",
        f"* **Sizes:** ResNet-18 width {WIDTH}, {SIZE} px, batch {BATCH}, {STEPS} timed steps; OBC with {CALIB} calibration images "
        f"({CALIB_BATCH} per batch); deploy at batch {E['CHECK_DEPLOY_BATCHES']}, {E['CHECK_REPEATS']} repeats.",
        "",
        "| step | status | wall s | timeout s | last log line when it failed |",
        "|---|---|---|---|---|",
        *[f"| {name} | {status} | {wall} | {limit} | {'' if status == 'ok' else last_line(name)} |" for name, status, wall, limit in steps_tsv],
        "",
        f"## Training step time, ResNet-18, {SIZE} px, batch {BATCH}, bf16 autocast",
        "",
    ]
    st = WORK / "step_time.json"
    if st.is_file():
        data = json.loads(st.read_text())
        lines += [f"Timed by: {data.get('path')}. Median of {STEPS} steps after 2 warm-up steps.", ""]
        lines += ["| method | step ms | × dense | peak GB |", "|---|---|---|---|"]
        for r in data["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | |")
            else:
                lines.append(f"| {r['method']} | {fmt(r.get('step_ms'))} | {fmt(r.get('vs_dense'), '.2f')} | {fmt(r.get('peak_mem_gb'), '.2f')} |")
    else:
        lines.append("No step-time record (see the step's log).")
    lines += ["", f"## OBC 2:4 w4 on every targeted ResNet-18 layer, {CALIB} calibration images", ""]
    for method in ("obc", "magnitude_rtn"):
        path = WORK / f"{method}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            lines.append(
                f"* **{method}**: {r.get('compress/targets')} layers in {fmt(r.get('time/drive_s'))} s wall on {r.get('time/drive_device')} "
                f"(prepare + calibration + solve); solvers {', '.join(r.get('solvers') or []) or 'n/a'}; "
                f"setting {r.get('setting')}; packed {r.get('compress/packed_bytes')} bytes, measured ratio {fmt(r.get('compress/measured_ratio'), '.2f')}x"
            )
    if not (WORK / "obc.json").is_file():
        lines.append("* OBC did not finish (see the step table); the deploy step used magnitude_rtn 2:4 w4 instead.")
    lines += ["", "## Deploy of the 2:4 w4 model", ""]
    res = RUN / "results.json"
    d = json.loads(res.read_text()) if res.is_file() else {}
    if "deploy/verdict" in d:
        lines += [
            f"`python -m slope_bench.deploy RUN --device {DEVICE} --batch {E['CHECK_DEPLOY_BATCHES']} --repeats {E['CHECK_REPEATS']}`, "
            f"dtype {d['deploy/dtype']}, {d['deploy/device_name']}.",
            "",
            "| batch | compressed ms | dense ms | speed-up | peak MB | dense peak MB |",
            "|---|---|---|---|---|---|",
        ]
        for b in d["deploy/batches"]:
            lines.append(
                f"| {b} | {fmt(d[f'deploy/latency_ms_b{b}'], '.2f')} | {fmt(d[f'deploy/latency_ms_dense_b{b}'], '.2f')} | "
                f"{fmt(d[f'deploy/speedup_b{b}'], '.2f')} | {fmt(d[f'deploy/peak_mem_mb_b{b}'])} | {fmt(d[f'deploy/peak_mem_mb_dense_b{b}'])} |"
            )
        reasons = sorted({r["reason"] for r in d["deploy/layers"] if r.get("reason")})
        lines += [
            "",
            f"* **Verdict:** {d['deploy/verdict']}",
            f"* **Kernels:** {d['deploy/kernels']}" + (f"; reasons: {' | '.join(reasons)}" if reasons else ""),
            f"* **Load:** read {fmt(d['deploy/read_s'], '.3f')} s, decode {fmt(d['deploy/decode_s'], '.2f')} s, build {fmt(d['deploy/build_s'], '.2f')} s; "
            f"weights {fmt(d['deploy/weights_mb'])} MB vs {fmt(d['deploy/weights_mb_dense'])} MB dense",
            f"* **Outputs:** max |diff| vs the finalized fp32 model {d['deploy/max_abs_diff']:.3g} (tolerance {d['deploy/tolerance']:.3g}, "
            f"match {d['deploy/outputs_match']}, top-1 agreement {d['deploy/top1_agreement']})",
        ]
    else:
        lines.append("Deploy did not finish (see the step table and the log).")
    lines += ["", f"Logs of this check: `{WORK}/*.log` (not kept in the repository)."]
    out = Path(E["CHECK_RECORD_DIR"]) / f"{slug(str(m.get('device')))}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    {"machine": machine, "steps": steps, "obc": obc, "fallback": fallback, "report": report}[sys.argv[1]]()
PYEOF

run_step machine 60 "$PY" "$CHECK_WORK/check.py" machine
if "$PY" -m slope_bench.step_time --help 2>/dev/null | grep -q -- '--precision' \
    && "$PY" -m slope_bench.step_time --help 2>/dev/null | grep -q -- '--device'; then
    # step_time can time on the device itself: use it (its JSON is read by the report)
    run_step step_time "$T_STEPS" "$PY" -m slope_bench.step_time --model resnet18 --size "$CHECK_SIZE" --width "$CHECK_WIDTH" \
        --batch "$CHECK_BATCH" --methods $CHECK_METHODS --steps "$CHECK_STEPS" --device "$CHECK_DEVICE" --precision bf16-mixed \
        --out "$CHECK_WORK/step_time_cli"
    if [[ -f "$CHECK_WORK/step_time_cli/step_time.json" ]]; then
        "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); json.dump({"path": "python -m slope_bench.step_time --precision bf16-mixed", "rows": [dict(x, vs_dense=x.get("vs_dense")) for x in r["rows"]]}, open(sys.argv[2], "w"))' \
            "$CHECK_WORK/step_time_cli/step_time.json" "$CHECK_WORK/step_time.json"
    fi
else
    # today's step_time has no --device / --precision (CPU, fp32): time the same drive() loop on the device under bf16 autocast
    run_step step_time "$T_STEPS" "$PY" "$CHECK_WORK/check.py" steps
fi
run_step obc "$T_OBC" "$PY" "$CHECK_WORK/check.py" obc
if [[ ! -f "$CHECK_WORK/run_2of4_w4/results.json" ]]; then
    run_step fallback_run 120 "$PY" "$CHECK_WORK/check.py" fallback
fi
# shellcheck disable=SC2086  # the batch list is meant to split
run_step deploy "$T_DEPLOY" "$PY" -m slope_bench.deploy "$CHECK_WORK/run_2of4_w4" --device "$CHECK_DEVICE" \
    --batch $CHECK_DEPLOY_BATCHES --repeats "$CHECK_REPEATS"
"$PY" "$CHECK_WORK/check.py" report
echo "device_check: $(( $(date +%s) - START )) s in all"
if grep -qv $'\tok\t' "$CHECK_WORK/steps.tsv"; then
    echo "device_check: some steps did not succeed (see $CHECK_WORK/steps.tsv)" >&2
    exit 1
fi
