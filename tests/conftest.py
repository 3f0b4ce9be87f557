"""Test setup: Triton runs interpreted on machines without CUDA.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, at collection.
With a CUDA device the suite runs real compiled Triton unless TRITON_INTERPRET is set by the caller.
"""

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _store_cache(tmp_path_factory):
    """Stores prepared on first use (atom_fast.distill.prepare.cached_store) go to a temporary folder
    made once per test run, never into the home folder; subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOM_FAST_CACHE", str(tmp_path_factory.mktemp("atom-fast-cache")))
        yield


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One torch thread per test: the tensors and networks here are tiny, and two OpenMP threads only
    add synchronization (10-50x slower on a busy 2-core machine). Tests marked ``default_threads``
    (the native op's parallel loops) keep torch's default."""
    if request.node.get_closest_marker("default_threads"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

