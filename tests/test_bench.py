"""bench/run.py: its plan, its output files, and pytest-benchmark timings of the loss.

Regular tests (part of the default run, ~15 s): build the quick plan, run the whole driver at a test
size (``bench/run.py --tiny``, child processes included) and check the JSON, CSV and PNG it writes.

Benchmark cases (skipped by default, so CI does not time anything): the loss forward+backward for the
eager reference and the native op at one small shape. Run them with either of

    ATOM_FAST_BENCH=1 python -m pytest tests/test_bench.py --benchmark-only
    python -m pytest tests/test_bench.py -m benchmark

(``benchmark`` is the marker pytest-benchmark registers; ``--benchmark-only`` alone does not enable
them, ``ATOM_FAST_BENCH=1`` or ``-m benchmark`` does).
"""

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import atom_fast
from atom_fast import environment

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m`: the repository root is not on sys.path
    sys.path.insert(0, str(ROOT))
BENCH = ROOT / "bench"

from bench import loss_table as lt  # noqa: E402
from bench import plan, report, step_table  # noqa: E402
from bench import run as bench_run  # noqa: E402

# a string condition: pytest evaluates it with `config` in scope, so `-m benchmark` can enable it
BENCH_CASE = [
    pytest.mark.benchmark(group="attention_loss fwd+bwd, 10 classes x 32 real, IPC 10, 64x16x16"),
    pytest.mark.skipif("os.environ.get('ATOM_FAST_BENCH') != '1' and "
                       "'benchmark' not in (config.getoption('markexpr') or '')",
                       reason="timing case: set ATOM_FAST_BENCH=1 or pass -m benchmark"),
]


# --------------------------------------------------------------------------------------------------
# pytest-benchmark cases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["eager", "native"])
@BENCH_CASE[0]
@BENCH_CASE[1]
def test_loss_fwd_bwd_benchmark(benchmark, provider):
    if provider == "native" and not atom_fast.backends.native_available():
        pytest.skip("the native op is not built")
    real, syn = lt.make_inputs(10, 32, 10, 64, 16, 16, torch.float32, torch.device("cpu"))
    fn = lt.loss_fn(provider, 10, 4.0, 4.0, 1.0, 1.0)
    benchmark.extra_info.update(bytes_moved=lt.bytes_moved(real, syn, "fwd+bwd"), provider=provider)
    benchmark.pedantic(lt.run_once, args=(fn, real, syn, "fwd+bwd"), rounds=20, warmup_rounds=2)


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


def test_quick_plan_covers_the_judged_items():
    jobs, notes = plan.build_plan(bench_run.parse_args(["--quick"]))
    required = [j for j in jobs if j["required"]]
    loss = [j for j in required if j["kind"] == "loss"]
    assert any(j["shape"] == (128, 32, 32) and j["ipc"] == 10 and j["classes"] == 10 and j["real"] == 128
               and {"eager", "compile", "native"} <= set(j["providers"]) and "fwd+bwd" in j["modes"]
               for j in loss)
    steps = {(j["label"], j["ipc"]) for j in required if j["kind"] == "step"}
    assert steps == {("ATOM (fused loop)", 10), ("ATOM (DataDAM script loop)", 10)}
    # every paper row at IPC 10 comes before anything at IPC 1 or 50
    order = [(j["label"], j["ipc"]) for j in jobs if j["kind"] == "step"]
    ipc10 = {(r.label, 10) for r in step_table.PAPER_ROWS}
    assert set(order[:len(ipc10)]) == ipc10 and {i for _, i in order[len(ipc10):]} == {1, 50}
    assert any("not run" in n for n in notes)


def test_full_plan_covers_every_shape_ipc_and_row():
    jobs, _ = plan.build_plan(bench_run.parse_args([]))
    loss = {(j["shape"], j["ipc"]) for j in jobs if j["kind"] == "loss"}
    assert loss == {(s, i) for s in lt.LAYERS for i in plan.IPCS}
    steps = {(j["label"], j["ipc"]) for j in jobs if j["kind"] == "step"}
    assert steps == {(r.label, i) for r in step_table.STEP_ROWS for i in plan.IPCS}
    assert all(j["required"] for j in jobs)


def test_optional_jobs_stop_at_the_budget(monkeypatch):
    ran = []

    def fake(job, args):
        ran.append(job)
        return []

    monkeypatch.setattr(plan, "run_loss_job", fake)
    monkeypatch.setattr(plan, "run_step_job", fake)
    args = bench_run.parse_args(["--quick", "--budget", "0"])
    jobs, _ = plan.build_plan(args)
    _, _, skipped, done = plan.run_plan(jobs, args, start=0.0)
    assert [j for j in ran if not j["required"]] == []  # every optional one is past a 0 s budget
    assert len(ran) == sum(j["required"] for j in jobs)
    assert len(skipped) == len(jobs) - len(ran) and all("budget" in s for s in skipped)


def test_output_paths(tmp_path):
    args = bench_run.parse_args(["--out", str(tmp_path / "new")])
    paths = report.output_paths(args.out, "cpu")
    assert [Path(p).suffix for p in paths] == [".json", ".csv", ".png"]
    assert all(Path(p).parent == tmp_path / "new" and Path(p).name.startswith("cpu-") for p in paths)
    args = bench_run.parse_args(["--out", str(tmp_path / "x.json")])
    assert report.output_paths(args.out, "h100")[1] == str(tmp_path / "x.csv")


def test_device_slug():
    assert environment.device_slug(torch.device("cpu")) == "cpu"


# --------------------------------------------------------------------------------------------------
# the whole driver at a test size
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: the figures do not matter here, and OpenMP spinning on a busy 2-core machine does
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_tiny_run_writes_json_csv_png(tiny_run):
    out, stdout = tiny_run
    files = sorted(p.suffix for p in out.iterdir())
    assert files == [".csv", ".json", ".png"]
    (json_path,) = out.glob("cpu-*.json")
    result = json.loads(json_path.read_text())
    assert {"schema", "started", "command", "mode", "environment", "config", "plan", "notes", "skipped",
            "loss", "step", "wall_s"} <= set(result)
    assert result["mode"] == "tiny" and result["skipped"] == []
    assert {"device_name", "torch", "triton", "threads", "native_isa"} <= set(result["environment"])
    assert result["environment"]["threads"] == 1

    providers = {r["provider"] for r in result["loss"]}
    assert "eager" in providers
    for r in result["loss"]:
        assert {"C", "H", "W", "layers", "ipc", "classes", "real_per_class", "provider", "mode",
                "median_s", "p20_s", "p80_s", "gbs", "copy_gbs", "copy_fraction", "bytes_moved",
                "speedup_vs_eager", "input_bytes"} <= set(r)
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
        if r["mode"] == "fwd+bwd":
            assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0

    labels = {r["row"] for r in result["step"]}
    assert labels == {"ATOM (DataDAM script loop)", "ATOM (fused loop)"}
    for r in result["step"]:
        assert "error" not in r, r
        assert {"method", "loop", "ipc", "median_s", "p20_s", "p80_s", "steps", "peak_bytes",
                "held_bytes", "transient_bytes", "speedup_vs_base"} <= set(r)
        assert r["steps"] == 2 and r["peak_bytes"] >= r["held_bytes"] > 0
        assert torch.isfinite(torch.tensor(r["last_loss"]))

    with open(out / json_path.with_suffix(".csv").name, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["loss"]) + len(result["step"])
    assert {r["table"] for r in rows} == {"loss", "step"}
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "| layer (C,H,W) |" in stdout and "| method (loop) |" in stdout


# --------------------------------------------------------------------------------------------------
# the package's pieces: environment, step rows, outputs without matplotlib, the plot
# --------------------------------------------------------------------------------------------------


def test_environment_names_and_versions():
    assert environment.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert environment.gpu_slug("NVIDIA H200") == "h200"
    assert environment.gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert environment.gpu_slug("Some Future GPU") == "cuda"
    assert environment.device_name("cpu")
    v = environment.versions()
    assert {"python", "platform", "atom_fast", "torch", "triton", "kornia", "numpy", "cuda"} <= set(v)
    assert v["torch"] == torch.__version__ and v["atom_fast"] == atom_fast.__version__


def test_a_new_step_row_is_one_entry(monkeypatch):
    new = step_table.StepRow("ATOM (fused loop, batch_real 512, 2 ranks)",
                             {"method": "atom", "loop": "fused", "batch_real": 512}, step_table.torchrun(2))
    monkeypatch.setattr(step_table, "STEP_ROWS", step_table.STEP_ROWS + (new,))
    args = bench_run.parse_args(["--only", "step"])
    jobs, _ = plan.build_plan(args)
    assert {j["ipc"] for j in jobs if j["label"] == new.label} == set(plan.IPCS)
    spec = step_table.job_spec(next(j for j in jobs if j["label"] == new.label), args)
    assert spec["config"] == {**step_table.BASE_CONFIG, "method": "atom", "loop": "fused", "batch_real": 512}
    assert "--nproc-per-node=2" in new.launcher.argv
    # --quick runs the paper's rows only, and says which rows it leaves out
    jobs, notes = plan.build_plan(bench_run.parse_args(["--quick", "--only", "step"]))
    assert new.label not in {j["label"] for j in jobs} and any(new.label in n for n in notes)


def _fake_rows():
    loss = [{"C": 128, "H": h, "W": h, "layers": "x", "ipc": ipc, "mode": "fwd+bwd", "provider": p,
             "classes": 10, "real_per_class": 128, "median_s": t, "p20_s": t, "p80_s": t, "gbs": 1.0,
             "copy_fraction": 0.1, "speedup_vs_eager": 0.02 / t, "speedup_vs_compile": None,
             "peak_extra_bytes": 1e6, "peak_extra_fraction": 0.1}
            for h in (16, 32) for ipc in (10, 1, 50) for p, t in (("eager", 0.02), ("native", 0.001))]
    step = [{"row": label, "ipc": ipc, "median_s": t, "p20_s": t, "p80_s": t, "classes": 10,
             "image": "3x32x32", "width": 128, "depth": 3, "norm": "instancenorm", "batch_real": 128,
             "steps": 5, "warmup": 1, "peak_bytes": 1e9, "speedup_vs_base": 1.7 / t / 1.7}
            for ipc in (10, 1, 50) for label, t in (("ATOM (DataDAM script loop)", 1.7), ("ATOM (fused loop)", 1.0))]
    return loss, step


def test_outputs_survive_a_missing_matplotlib(monkeypatch, tmp_path, capsys):
    loss, step = _fake_rows()
    monkeypatch.setattr(plan, "run_plan", lambda jobs, args, start: (loss, step, [], []))
    # the figure beside the step rows: twelve 2048x2048 matmuls (~3 s of CPU) that nothing here reads
    monkeypatch.setattr(bench_run.measure, "matmul_gflops", lambda device, n=2048: 1.0)
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` raises ImportError
    with pytest.warns(UserWarning, match="matplotlib"):
        bench_run.main(["--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["loss"]) == len(loss) and len(result["step"]) == len(step)
    with open(tmp_path / "r.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(loss) + len(step)
    assert not (tmp_path / "r.png").exists()
    out = capsys.readouterr().out
    assert "| method (loop) |" in out and "r.png" not in out


def test_plot_shows_speedups_and_peak_memory_in_ipc_order():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    loss, step = _fake_rows()
    fig = report.figure(loss, step, "test")
    try:
        (loss_speed, step_speed), (loss_mem, step_mem) = [fig.axes[:2], fig.axes[2:]]
        assert "memory" in loss_mem.get_ylabel() and "memory" in step_mem.get_ylabel()
        assert "speedup" in loss_speed.get_ylabel() and "speedup" in step_speed.get_ylabel()
        for ax in (step_speed, step_mem):
            assert [t.get_text() for t in ax.get_xticklabels()] == ["IPC 1", "IPC 10", "IPC 50"]
        ipcs = [t.get_text().split("IPC ")[1].split()[0] for t in loss_mem.get_xticklabels()]
        assert ipcs == ["1", "10", "50", "1", "10", "50"]
        assert sum(len(c) for c in step_mem.containers) == len(step)  # one bar per row and IPC
    finally:
        plt.close(fig)


@pytest.mark.slow
def test_both_entry_points_parse_the_same_options():
    for cmd in ([sys.executable, "-m", "bench.run", "--help"], [sys.executable, str(BENCH / "run.py"), "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for option in ("--device", "--quick", "--only", "--out", "--providers", "--budget", "--no-memory"):
            assert option in proc.stdout


def test_op_min_times_reports_every_shape_and_power(capsys):
    from atom_fast.backends import native
    if not native.AVAILABLE:
        pytest.skip("native op not built")
    from bench import op_min_times
    assert op_min_times.main(["--calls", "2", "--shapes", "8x4x4,3x5x7", "--powers", "4,3.7"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = [(tuple(r["C_H_W"]), r["p"]) for r in out["rows"]]
    assert rows == [((8, 4, 4), 4.0), ((8, 4, 4), 3.7), ((3, 5, 7), 4.0), ((3, 5, 7), 3.7)]
    for r in out["rows"]:
        assert r["elements"] == 4 * r["C_H_W"][0] * r["C_H_W"][1] * r["C_H_W"][2]
        assert r["stats_ns_per_element"] == pytest.approx(r["stats_min_s"] / r["elements"] * 1e9)
        assert r["backward_min_s"] > 0 and r["copy_min_s"] > 0
    with pytest.raises(SystemExit):
        op_min_times.main(["--shapes", "8x4"])


def test_powers_table_interleaves_isas_and_powers(tmp_path, monkeypatch, capsys):
    from atom_fast.backends import native
    if not native.AVAILABLE:
        pytest.skip("native op not built")
    from bench import powers_table
    monkeypatch.setenv("ATOM_FAST_CPU_ISA", "default")
    out = tmp_path / "p.json"
    result = powers_table.main(["--shape", "4x3x5", "--classes", "2", "--real", "3", "--ipc", "2",
                                "--powers", "4,3.7", "--isas", "default", "--rounds", "2",
                                "--warmup", "0", "--json", str(out)])
    assert os.environ["ATOM_FAST_CPU_ISA"] == "default"  # the caller's setting is restored
    rows = json.loads(out.read_text())["rows"]
    assert [(r["isa"], r["p"]) for r in rows] == [("default", 4.0), ("default", 3.7)]
    assert rows[0]["vs_p4"] == 1.0 and len(rows[1]["times_s"]) == 2
    # (2 x 3 real + 2 x 2 syn) x 60 floats read, 2 x 2 x 60 read and written back
    assert result["bytes_moved"] == ((6 + 4) * 60 + 2 * 4 * 60) * 4
    assert "| default | 3.7 |" in capsys.readouterr().out
    for bad in (["--powers", "3.7"], ["--shape", "4x3"], ["--rounds", "1"]):
        with pytest.raises(SystemExit):
            powers_table.parse_args(bad)


def test_pow_ulps_reports_every_power_within_the_test_bound(monkeypatch):
    from atom_fast.backends import native
    if not native.AVAILABLE:
        pytest.skip("native op not built")
    from bench import pow_ulps
    monkeypatch.delenv("ATOM_FAST_CPU_ISA", raising=False)
    result = pow_ulps.main(["--isas", "default,avx10"])
    assert "ATOM_FAST_CPU_ISA" not in os.environ
    assert "not on this CPU" in result["isas"]["avx10"]
    rows = result["isas"]["default"]["max_ulps"]
    assert set(rows) == {str(p) for p in pow_ulps.POWERS}
    assert 0 < result["isas"]["default"]["worst"] <= 1.0


def test_prefetch_table_times_every_setting(tmp_path, monkeypatch):
    from atom_fast.backends import native
    if not native.AVAILABLE:
        pytest.skip("native op not built")
    from bench import prefetch_table
    monkeypatch.delenv("ATOM_FAST_CPU_PREFETCH", raising=False)
    out = tmp_path / "p.json"
    result = prefetch_table.main(["--shapes", "4x3x5,2x40x30", "--powers", "4,3.7", "--classes", "2",
                                  "--real", "3", "--ipc", "1", "--rounds", "2", "--warmup", "0",
                                  "--json", str(out)])
    assert "ATOM_FAST_CPU_PREFETCH" not in os.environ  # the caller's setting is restored
    assert json.loads(out.read_text())["shapes"][1]["shape"] == [2, 40, 30]
    for sh in result["shapes"]:
        assert [(r["setting"], r["p"]) for r in sh["rows"]] == [
            (s, p) for s in ("none", "rows", "all") for p in (4.0, 3.7)]
        assert all(r["vs_all"] == 1.0 for r in sh["rows"] if r["setting"] == "all")
    with pytest.raises(SystemExit):
        prefetch_table.parse_args(["--shapes", "4x3"])
