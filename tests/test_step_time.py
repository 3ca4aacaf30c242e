import json

import pytest

from slope_bench import step_time


def test_step_time_records_every_method_against_dense(tmp_path, capsys):
    assert (
        step_time.main(
            ["--methods", "slope", "prune", "--size", "8", "--width", "4", "--batch", "4", "--steps", "1", "--out", str(tmp_path)]
        )
        == 0
    )
    record = json.loads((tmp_path / "step_time.json").read_text())
    rows = record["rows"]
    assert [r["method"] for r in rows] == ["dense", "slope", "prune"]
    assert rows[0]["vs_dense"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert record["machine"]["cores"] >= 1 and record["model"] == "resnet18 width 4"
    assert "| 8×8 | slope |" in (tmp_path / "step_time.md").read_text()


@pytest.mark.parametrize("argv", [["--methods", "nope"], ["--size", "0"]])
def test_step_time_rejects_bad_input(argv):
    with pytest.raises(SystemExit) as e:
        step_time.main(argv)
    assert e.value.code == 2


@pytest.mark.slow
def test_step_time_on_vit_small(tmp_path):
    argv = ["--model", "vit_small", "--methods", "slope", "--size", "8", "--batch", "2", "--steps", "1", "--out", str(tmp_path)]
    assert step_time.main(argv) == 0
    record = json.loads((tmp_path / "step_time.json").read_text())
    assert record["model"].startswith("vit_small") and [r["method"] for r in record["rows"]] == ["dense", "slope"]
