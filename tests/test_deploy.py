"""`python -m slope_bench.deploy`: the packed artifact deployed on real kernels and measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slope_bench import deploy as dp
from slope_bench.export import PACKED_NAME

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    """ResNet-18 width 8 on 8 px inputs, magnitude 2:4 + w4 through drive + export_packed."""
    out = tmp_path_factory.mktemp("deploy") / "resnet18"
    dp.synthetic_run(out, "resnet18", "magnitude_rtn", image_size=8, model_overrides={"width": 8}, batch=4, log=quiet)
    return out


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    """A tiny ViT with 4-bit linear layers (no sparsity): the int kernels apply."""
    out = tmp_path_factory.mktemp("deploy") / "vit"
    dp.synthetic_run(
        out,
        "vit_small",
        "magnitude_rtn",
        image_size=8,
        model_overrides=TINY_VIT,
        method_overrides={"n": None, "m": None},
        batch=4,
        log=quiet,
    )
    return out


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and stderr lines of the command line."""
    try:
        code = dp.main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_deploy_records_keys_and_keeps_the_others(resnet_run, capsys):
    before = json.loads((resnet_run / "results.json").read_text())
    code, err = run_main([str(resnet_run), "--batch", "1", "2", "--repeats", "1"], capsys)
    assert code == 0, err
    after = json.loads((resnet_run / "results.json").read_text())
    assert {k: after[k] for k in before} == before  # every other key kept as it was
    for key in ("device", "load_s", "read_s", "decode_s", "build_s", "peak_mem_mb", "kernels", "max_abs_diff", "layers", "verdict"):
        assert f"deploy/{key}" in after, key
    for b in (1, 2):
        for key in ("latency_ms", "latency_ms_dense", "speedup", "peak_mem_mb", "peak_mem_mb_dense"):
            assert after[f"deploy/{key}_b{b}"] > 0
    assert after["deploy/device"] == "cpu" and after["deploy/batches"] == [1, 2]
    # the finalized model and the deployed one agree (every ResNet layer is a convolution: dense)
    assert after["deploy/outputs_match"] and after["deploy/max_abs_diff"] == 0.0
    targeted = [r["name"] for r in after["layers"] if not r.get("skipped")]
    assert [r["name"] for r in after["deploy/layers"]] == targeted
    assert after["deploy/kernels"] == {"dense": len(targeted)}
    for record in after["deploy/layers"]:
        assert record["kernel"] == "dense" and record["reason"].startswith("dense fallback: Conv2d")


def test_deploy_runs_again_and_replaces_stale_keys(resnet_run, capsys):
    results = json.loads((resnet_run / "results.json").read_text())
    results["deploy/latency_ms_b999"] = 1.0
    (resnet_run / "results.json").write_text(json.dumps(results))
    code, _ = run_main([str(resnet_run), "--batch", "3", "--repeats", "1"], capsys)
    assert code == 0
    after = json.loads((resnet_run / "results.json").read_text())
    assert "deploy/latency_ms_b999" not in after and "deploy/latency_ms_b1" not in after and "deploy/latency_ms_b3" in after


def test_int_kernels_on_linear_layers_match_the_finalized_model(vit_run):
    out = dp.deploy(vit_run, batches=[2], repeats=1, write=False, log=quiet)
    layers = {r["name"]: r for r in out["deploy/layers"]}
    assert layers and set(out["deploy/kernels"]) <= {"int4_weight_only", "int8_weight_only"}
    for record in layers.values():
        assert record["type"] == "Linear" and record["act_dtype"] == "bf16"
    # bf16 activations: close to the fp32 finalized model, not equal
    assert out["deploy/outputs_match"] and 0 <= out["deploy/max_abs_diff"] <= out["deploy/tolerance"]
    assert out["deploy/weights_mb"] < out["deploy/weights_mb_dense"]


def test_deployed_model_against_finalized_tensors(vit_run):
    cfg = dp.read_config(vit_run)
    base = dp.build_model(cfg, *dp.input_shape(cfg, vit_run))
    base.load_state_dict(load_file(str(vit_run / "finalized.safetensors")))
    base.eval()
    targets = dp.targeted_layers(base, json.loads((vit_run / "results.json").read_text()))
    deployed, records = dp.build_deployed(base, targets, torch.device("cpu"), torch.float32, ["int8_weight_only"])
    assert {r["kernel"] for r in records} == {"int8_weight_only"}
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        want, got = base(x), deployed(x)
    assert torch.allclose(got, want, atol=0.05 * float(want.abs().max()))


def test_a_missing_kernel_falls_back_with_the_reason(vit_run, monkeypatch):
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    out = dp.deploy(vit_run, batches=[1], repeats=1, write=False, log=quiet)
    assert set(out["deploy/kernels"]) == {"int8_weight_only"}
    for record in out["deploy/layers"]:
        assert "int4_weight_only: torch" in record["reason"] and "has no torch._weight_int4pack_mm_for_cpu" in record["reason"]
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    out = dp.deploy(vit_run, batches=[1], repeats=1, write=False, log=quiet)
    assert out["deploy/kernels"] == {"dense": len(out["deploy/layers"])}
    assert all(r["reason"].startswith("dense fallback: int4_weight_only") for r in out["deploy/layers"])
    assert out["deploy/max_abs_diff"] == 0.0


def test_two_of_four_on_cpu_says_the_sparsity_is_not_exploited(tmp_path):
    run = tmp_path / "vit24"
    dp.synthetic_run(run, "vit_small", "magnitude_rtn", image_size=8, model_overrides=TINY_VIT, batch=4, log=quiet)
    out = dp.deploy(run, batches=[1], repeats=1, write=False, log=quiet)
    for record in out["deploy/layers"]:
        assert "semi_structured_2of4: 2:4 sparsity not exploited" in record["reason"]
        assert record["kernel"] in ("int4_weight_only", "int8_weight_only")


def test_integer_grid_reads_levels_and_refuses_floats():
    torch.manual_seed(0)
    ints = torch.randint(-8, 8, (6, 64))
    ints[:, 0] = 7  # the max-abs level of every row
    scales = torch.rand(6) + 0.01
    weight = ints.float() * scales[:, None]
    grid = dp.integer_grid(weight, 64, 15)
    assert grid is not None
    got_ints, got_scales = grid
    assert torch.allclose(got_ints.float() * got_scales[:, None], weight, rtol=1e-6)
    assert dp.integer_grid(torch.randn(6, 64), 64, 127) is None
    grouped = torch.cat([weight[:, :32], 3 * weight[:, 32:]], 1)  # another scale per group of 32
    assert dp.integer_grid(grouped, 64, 15) is None and dp.integer_grid(grouped, 32, 15) is not None
    assert dp.is_two_of_four(torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3]])) and not dp.is_two_of_four(torch.ones(1, 4))


@pytest.mark.parametrize(
    ("case", "argument"),
    [
        ("no_results", "RUN_DIR"),
        ("no_packed", "RUN_DIR"),
        ("no_dir", "RUN_DIR"),
        ("cuda", "--device"),
        ("batch", "--batch"),
        ("repeats", "--repeats"),
        ("kernel", "--kernels"),
        ("dtype", "--dtype"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(resnet_run, tmp_path, capsys, case, argument):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("results.json", PACKED_NAME, "finalized.safetensors"):
        (run / name).write_bytes((resnet_run / name).read_bytes())
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_bytes((resnet_run / ".hydra" / "config.yaml").read_bytes())
    args = [str(run), "--repeats", "1", "--batch", "1"]
    if case == "no_results":
        (run / "results.json").unlink()
    elif case == "no_packed":
        (run / PACKED_NAME).unlink()
    elif case == "no_dir":
        args[0] = str(tmp_path / "nowhere")
    elif case == "cuda":
        args += ["--device", "cuda"]
    elif case == "batch":
        args += ["--batch", "1", "0"]
    elif case == "repeats":
        args += ["--repeats", "0"]
    elif case == "kernel":
        args += ["--kernels", "int3_magic"]
    elif case == "dtype":
        args += ["--dtype", "fp8"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_main(args, capsys)
    assert code == 2
    assert len(err) == 1 and argument in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_batch_below_one_from_argparse_types(resnet_run, capsys):
    code, err = run_main([str(resnet_run), "--batch", "x"], capsys)
    assert code == 2 and len(err) == 1 and "--batch" in err[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deploy_on_cuda(vit_run, resnet_run):
    for run in (vit_run, resnet_run):
        out = dp.deploy(run, device="cuda", batches=[1, 8], repeats=2, write=False, log=quiet)
        assert out["deploy/device"] == "cuda" and out["deploy/dtype"] == "bf16"
        assert out["deploy/outputs_match"], out["deploy/max_abs_diff"]
        assert out["deploy/peak_mem_mb_b8"] > 0 and out["deploy/mem_method"] == "torch.cuda.max_memory_allocated"
        assert all(r["kernel"] in dp.KERNELS for r in out["deploy/layers"])
