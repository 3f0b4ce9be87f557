"""The Triton kernels compile for an H100 (sm_90) without spilling, checked on any machine.

The interpreter runs the kernels as NumPy; only a real compile shows code that does not lower for the
GPU. ``tools/compile_check/sm90.py`` compiles ahead of time with the assembler bundled in the triton wheel.
It runs in the background from the start of the test session (conftest.py, tests/_background.py).
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bundled_assembler():
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton.backends.nvidia")
    except ImportError:
        return False
    return spec is not None and os.path.isdir(os.path.join(spec.submodule_search_locations[0], "bin"))


ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
ENV.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.mark.slow
@pytest.mark.skipif(not _bundled_assembler(), reason="triton wheel without the NVIDIA backend binaries")
@pytest.mark.background([sys.executable, os.path.join(ROOT, "tools", "compile_check", "sm90.py"), "--quick"],
                        cwd=ROOT, env=ENV, timeout=900)
def test_kernels_compile_for_sm90_without_spills(background_result):
    result = background_result
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, report
    assert " 0 failed or spilled" in result.stdout, report
