"""bench/validate_gpu.sh and its pieces, on any machine: without a GPU it must say so and fail; its
steps must be the ones docs/gpu.md promises; the tests' GPU-only cases must be counted as run only
when they passed; the sanitizer cases must be right (checked here on the CPU backends)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `python -m`
    sys.path.insert(0, str(ROOT))

from tools import sanitizer_cases, validate_gpu  # noqa: E402

import atom_fast  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_says_so_and_exits_nonzero(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "validate_gpu.sh"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode != 0
    assert "CPU build" in proc.stderr or "no CUDA GPU" in proc.stderr, proc.stderr
    assert "Nothing was run" in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_sanitizer_cases_need_a_gpu(capsys):
    assert sanitizer_cases.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_steps_are_build_tests_sanitizers_bench():
    plan = validate_gpu.steps("py", "OUT", "h100", "full", True, "/cuda/bin/compute-sanitizer")
    names = [name for name, _, _ in plan]
    assert names == ["build", "tests", "sync", "cases", "memcheck", "racecheck", "bench"]
    cmd = {name: (" ".join(argv), env) for name, argv, env in plan}
    assert cmd["build"][1] == {"ATOM_FAST_BUILD_CUDA": "1"}
    assert "pip install --no-build-isolation -e" in cmd["build"][0]
    assert cmd["tests"][0].startswith("py -m pytest") and "--junitxml=OUT/h100-tests.xml" in cmd["tests"][0]
    assert "--tool memcheck" in cmd["memcheck"][0] and "--tool racecheck" in cmd["racecheck"][0]
    assert all("sanitizer_cases.py" in cmd[n][0] for n in ("cases", "memcheck", "racecheck"))
    assert cmd["bench"][0] == "py -m bench.run --device cuda --out OUT/h100-bench.json"
    assert cmd["sync"][0].endswith("sync_check.py --device cuda --out OUT/h100-sync.json")
    # no compute-sanitizer: those steps are left out (and reported as skipped by main)
    assert [n for n, _, _ in validate_gpu.steps("py", "OUT", "h100", "quick", False, None)] == \
        ["tests", "sync", "cases", "bench"]


def _junit(tmp_path, outcomes):
    cases = "".join(
        f'<testcase classname="tests.test_fused" name="{name}">'
        + {"passed": "", "skipped": '<skipped message="needs a GPU"/>', "failed": "<failure/>"}[o]
        + "</testcase>" for name, o in outcomes.items())
    path = tmp_path / "t.xml"
    path.write_text(f'<testsuites><testsuite name="pytest">{cases}'
                    '<testcase classname="tests.test_api" name="test_x"/></testsuite></testsuites>')
    return validate_gpu.test_counts(path)


def test_gpu_only_tests_count_only_when_they_passed(tmp_path):
    name = "test_int64_offsets_beyond_2_31_elements"
    counts = _junit(tmp_path, {f"{name}[triton]": "passed", f"{name}[native]": "passed"})
    assert counts["passed"] == 3 and validate_gpu.gpu_only_problem(counts) is None
    counts = _junit(tmp_path, {f"{name}[triton]": "passed", f"{name}[native]": "skipped"})
    assert counts["skipped"] == 1 and "native" in validate_gpu.gpu_only_problem(counts)
    counts = _junit(tmp_path, {f"{name}[triton]": "failed"})
    assert "missing" in validate_gpu.gpu_only_problem(counts)


def test_gpu_only_tests_exist_under_that_name():
    # the validation looks them up by name: a rename must update GPU_ONLY_TESTS
    text = (ROOT / "tests" / "test_fused.py").read_text()
    assert all(f"def {name}(backend" in text for name in validate_gpu.GPU_ONLY_TESTS)


@pytest.mark.parametrize("name,case", sanitizer_cases.cases(), ids=[n for n, _ in sanitizer_cases.cases()])
def test_sanitizer_cases_agree_with_the_reference_on_cpu(name, case):
    if not atom_fast.backends.native_available():
        pytest.skip("the native op is not built")
    assert sanitizer_cases.run_case("native", device=torch.device("cpu"), **case)


def test_sanitizer_case_check_catches_a_wrong_result(monkeypatch):
    name, case = sanitizer_cases.cases()[0]
    real_loss = atom_fast.attention_loss

    def off(*args, backend=None, **kw):
        loss = real_loss(*args, backend=backend, **kw)
        return loss * 1.01 if backend != "reference" else loss

    monkeypatch.setattr(atom_fast, "attention_loss", off)
    assert not sanitizer_cases.run_case("native", device=torch.device("cpu"), **case)


@pytest.mark.parametrize("which", ["16x8x8 float32 labels, real requires grad",
                                   "7x5x3 float32 labels, real side as class statistics"])
def test_a_sanitizer_case_runs_the_triton_backend(which):
    # interpreted on a CPU machine (conftest.py), compiled on a GPU one
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = dict(sanitizer_cases.cases())[which]
    assert sanitizer_cases.run_case("triton", device=device, **case)


def test_the_sync_check_runs_a_step_on_meta(tmp_path):
    """tools/sync_check.py (the GPU step's sync check) imports and runs on any machine with --device
    meta; without CUDA, --device cuda says so and exits 2."""
    from tools import sync_check

    out = tmp_path / "sync.json"
    assert sync_check.main(["--device", "meta", "--size", "8", "--width", "4", "--batch-real", "4",
                            "--classes", "3", "--out", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["device"] == "meta" and result["by_op"]["convolution"] > 0
    if not torch.cuda.is_available():
        assert sync_check.main(["--device", "cuda"]) == 2
