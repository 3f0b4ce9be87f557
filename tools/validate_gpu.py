"""One-command validation on an NVIDIA GPU, after installing: what bench/validate_gpu.sh runs.

Steps (each logged to its own file; a failed step does not stop the later ones):

1. build    ``ATOM_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .[test,bench]``: the native op
            with its CUDA kernels, against the torch already installed (a CUDA build of torch)
2. tests    the whole test suite on the GPU: compiled Triton (TRITON_INTERPRET unset), the CUDA op,
            and the GPU-only cases (the > 2^31-element offsets test, ``skipif(DEVICE.type != "cuda")``
            in tests/test_fused.py), which must pass for both fused backends, not skip
3. sync     tools/sync_check.py: one fused step under ``torch.cuda.set_sync_debug_mode("error")``
            (any host synchronization fails it) and the profiler: kernel launches per step
4. cases    tools/sanitizer_cases.py: every Triton and CUDA kernel once on small shapes
5. memcheck, racecheck
            the same cases under ``compute-sanitizer --tool memcheck`` / ``racecheck`` (skipped, with
            a message, when compute-sanitizer is not found)
6. bench    ``python -m bench.run --device cuda`` (``--bench quick`` for the shorter run)

Everything goes to ``bench/results/gpu-validation-<gpu>-<date>/`` (``--out``), each file named
``<gpu>-<step>.log`` (``<gpu>`` e.g. ``h100``), with ``<gpu>-summary.json`` holding the device name,
versions, every command, its exit status, seconds and log, and the tests' counts. Exit status 0 only
if every step that ran passed. Without a CUDA GPU (or with a CPU build of torch) it says so and exits
1 before doing anything.

    bash bench/validate_gpu.sh [--bench quick|full|none] [--no-build] [--out DIR]
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# tests that exist to run on a GPU: they must pass there for every fused backend, never skip
GPU_ONLY_TESTS = ("test_int64_offsets_beyond_2_31_elements",)


def preflight():
    """(gpu name, None) when a CUDA GPU is usable from a CUDA build of torch, else (None, why)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not importable; install a CUDA build of torch first"
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU build; install a CUDA build of torch "
                      "(e.g. from https://download.pytorch.org/whl/cu128) and run this again")
    if not torch.cuda.is_available():
        return None, (f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                      "device (torch.cuda.is_available() is False; check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return torch.cuda.get_device_name(0), None


def find_sanitizer():
    """The compute-sanitizer executable: on PATH, or in CUDA_HOME / the usual toolkit folder."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", "compute-sanitizer")
            if os.access(path, os.X_OK):
                return path
    return None


def steps(python, out, slug, bench, build, sanitizer):
    """[(name, argv, extra environment)] in run order; ``sanitizer`` None leaves its steps out."""
    cases = [python, os.path.join(ROOT, "tools", "sanitizer_cases.py")]
    junit = os.path.join(out, f"{slug}-tests.xml")
    plan = []
    if build:
        plan.append(("build", [python, "-m", "pip", "install", "--no-build-isolation", "-e", ".[test,bench]"],
                     {"ATOM_FAST_BUILD_CUDA": "1"}))
    plan.append(("tests", [python, "-m", "pytest", "-q", "-rs", f"--junitxml={junit}"], {}))
    plan.append(("sync", [python, os.path.join(ROOT, "tools", "sync_check.py"), "--device", "cuda",
                          "--out", os.path.join(out, f"{slug}-sync.json")], {}))
    plan.append(("cases", cases, {}))
    if sanitizer:
        # no caching allocator under memcheck: every tensor is its own allocation, so an access past
        # a tensor's end is past an allocation's end
        plan.append(("memcheck", [sanitizer, "--tool", "memcheck", "--leak-check", "no", "--error-exitcode", "1",
                                  *cases], {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
        plan.append(("racecheck", [sanitizer, "--tool", "racecheck", "--racecheck-report", "all",
                                   "--error-exitcode", "1", *cases], {}))
    if bench != "none":
        plan.append(("bench", [python, "-m", "bench.run", "--device", "cuda",
                               *(["--quick"] if bench == "quick" else []),
                               "--out", os.path.join(out, f"{slug}-bench.json")], {}))
    return plan


def test_counts(junit_path):
    """{passed, failed, errors, skipped, gpu_only: {test id: outcome}} from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "gpu_only": {}}
    root = ET.parse(junit_path).getroot()
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
        counts[outcome] += 1
        if case.get("name", "").split("[")[0] in GPU_ONLY_TESTS:
            counts["gpu_only"][case.get("name")] = outcome
    return counts


def gpu_only_problem(counts):
    """None if every GPU-only test ran and passed for both fused backends, else what is wrong."""
    outcomes = counts["gpu_only"]
    missing = [f"{t}[{b}]" for t in GPU_ONLY_TESTS for b in ("triton", "native") if f"{t}[{b}]" not in outcomes]
    bad = {k: v for k, v in outcomes.items() if v != "passed"}
    if missing or bad:
        return f"GPU-only tests not passed: missing {missing}, {bad}"
    return None


def run_step(name, argv, extra_env, log_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATOM_FAST_BACKEND")}
    env.update(extra_env)
    command = " ".join([*(f"{k}={v}" for k, v in extra_env.items()), *map(shlex.quote, argv)])
    print(f"== {name}: {command}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {command}\n\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        tail = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-15:]
        returncode = proc.wait()
    seconds = time.perf_counter() - t0
    print(f"   {name}: {'ok' if returncode == 0 else f'FAILED (exit {returncode})'} in {seconds:.0f} s; "
          f"log {os.path.relpath(log_path, ROOT)}", flush=True)
    if returncode != 0:
        print("".join("   | " + line for line in tail), end="", flush=True)
    return {"command": command, "returncode": returncode, "seconds": round(seconds, 1),
            "log": os.path.relpath(log_path, ROOT), "ok": returncode == 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/validate_gpu.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--bench", choices=["full", "quick", "none"], default="full",
                   help="bench/run.py --device cuda: everything (default), --quick, or not at all")
    p.add_argument("--no-build", dest="build", action="store_false",
                   help="use the installed build (skip the pip install of step 1)")
    p.add_argument("--out", help="folder for the logs and JSON (default bench/results/gpu-validation-<gpu>-<date>/)")
    p.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit (no GPU needed)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    python = sys.executable
    if args.dry_run:
        for name, argv_, env in steps(python, args.out or "OUT", "gpu", args.bench, args.build,
                                      find_sanitizer() or "compute-sanitizer"):
            print(f"{name}: {' '.join([*(f'{k}={v}' for k, v in env.items()), *argv_])}")
        return 0
    gpu, why = preflight()
    if gpu is None:
        print(f"validate_gpu: {why}. Nothing was run.", file=sys.stderr)
        return 1
    sys.path.insert(0, ROOT)
    from atom_fast.environment import gpu_slug  # noqa: E402  (before the build: no native op loaded)

    slug = gpu_slug(gpu)
    date = datetime.date.today().isoformat()
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", f"gpu-validation-{slug}-{date}"))
    os.makedirs(out, exist_ok=True)
    sanitizer = find_sanitizer()
    summary = {"device_name": gpu, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "python": python, "steps": {}}
    if sanitizer is None:
        print("validate_gpu: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): "
              "memcheck and racecheck are skipped", flush=True)
        summary["steps"]["memcheck"] = summary["steps"]["racecheck"] = {"skipped": "compute-sanitizer not found"}
    for name, argv_, env in steps(python, out, slug, args.bench, args.build, sanitizer):
        result = run_step(name, argv_, env, os.path.join(out, f"{slug}-{name}.log"))
        if name == "tests":
            junit = os.path.join(out, f"{slug}-tests.xml")
            if os.path.exists(junit):
                result["counts"] = test_counts(junit)
                problem = gpu_only_problem(result["counts"])
                if problem:
                    result.update(ok=False, problem=problem)
                    print(f"   tests: {problem}", flush=True)
        summary["steps"][name] = result
    versions = subprocess.run([python, "-c", "import json, atom_fast.environment as e, atom_fast.backends as l, "
                               "torch; print(json.dumps({**e.versions(), 'native_cuda': "
                               "l.native_available(torch.device('cuda'))}))"],
                              cwd=ROOT, capture_output=True, text=True)
    summary["versions"] = json.loads(versions.stdout) if versions.returncode == 0 else versions.stderr[-2000:]
    summary["ok"] = all(s.get("ok", True) for s in summary["steps"].values())
    path = os.path.join(out, f"{slug}-summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    failed = [n for n, s in summary["steps"].items() if not s.get("ok", True)]
    print(f"\nvalidate_gpu on {gpu}: {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"summary {os.path.relpath(path, ROOT)}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
