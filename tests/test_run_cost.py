"""bench/run_cost.py: one shape and IPC through the CLI's step and evaluation, and the JSON it writes."""

import json

import pytest

from bench import run_cost


@pytest.mark.slow
def test_one_shape_writes_timings_and_the_projection(tmp_path, monkeypatch):
    monkeypatch.setattr(run_cost, "PLAN", [("mnist", 1)])
    monkeypatch.setattr(run_cost, "PER_CLASS", 128)   # batch_real's default
    monkeypatch.setattr(run_cost, "TEST_IMAGES", 20)
    monkeypatch.setattr(run_cost, "keep_freed_memory", lambda: False)  # leave this process's allocator alone
    out = tmp_path / "cost.json"
    result = run_cost.main(["--steps", "1", "--epochs", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    row, = saved["rows"]
    assert row["dataset_shape"] == "mnist" and row["ipc"] == 1
    step = row["iteration_seconds"]["atom"]
    assert len(step["all"]) == 1 and step["median"] > 0
    ev = row["evaluation"]
    assert ev["seconds_per_epoch"] > 0 and ev["seconds_per_test_pass"] > 0
    d = saved["settings"]["projection"]
    assert row["projected_default_seconds"]["distill"]["atom"] == pytest.approx(d["iterations"] * step["median"])
    assert row["projected_default_seconds"]["evaluation"] == pytest.approx(
        d["eval_models"] * (d["eval_epochs"] * ev["seconds_per_epoch"]
                            + d["test_passes_per_model"] * ev["seconds_per_test_pass"]))
    assert saved["command"].startswith("python -m bench.run_cost") and saved["conditions"]["torch"]
