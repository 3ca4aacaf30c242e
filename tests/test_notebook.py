"""notebooks/leaderboard.ipynb runs top to bottom on a leaderboard made from hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slope_bench import leaderboard

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "leaderboard.ipynb"


@pytest.fixture(scope="module")
def kernel_name() -> str:
    """The python3 kernel of this interpreter, registered for the user when missing."""
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=True)
    return "python3"


def _run(
    root: Path,
    method: str,
    setting: str,
    seed: int,
    top1: float,
    ratio: float,
    bits: int,
) -> None:
    run_dir = root / f"{method}_{setting.replace(' ', '_').replace(':', '-')}_{seed}"
    run_dir.mkdir(parents=True)
    record = {
        "method": method,
        "model": "resnet18",
        "task": "digits",
        "seed": seed,
        "setting": setting,
        "status": "ok",
        "test/top1": top1,
        "test/top1_dense": 0.95,
        "test/retention": top1 / 0.95,
        "compress/ratio": ratio,
        "layers": [
            {
                "name": f"layer{i}.conv",
                "shape": [64, 64, 3, 3],
                "pattern": "2:4",
                "w_bits": bits,
                "sparsity": 0.5 + 0.01 * i,
                "levels": 2**bits - 1,
            }
            for i in range(4)
        ],
    }
    (run_dir / "results.json").write_text(json.dumps(record))


def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_name: str) -> None:
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _run(runs, "slope", "2:4 w4", seed, 0.91 + 0.01 * seed, 10.0, 4)
        _run(runs, "prune_then_quantize", "2:4 w2", seed, 0.80 + 0.02 * seed, 18.0, 2)
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{")
    paths = leaderboard.write([runs], tmp_path / "board")
    monkeypatch.setenv("LEADERBOARD_CSV", str(paths["csv"]))
    monkeypatch.setenv("LEADERBOARD_RUNS", str(runs))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 settings in" in text and "4 runs with layer records" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "expected the Pareto plot and the per-layer view"
    table = next(o for o in outputs if "text/html" in o.get("data", {}))
    assert "prune_then_quantize" in table["data"]["text/html"]
