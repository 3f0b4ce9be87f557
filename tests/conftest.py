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


# the native op's CPU row kernels (csrc/cpu): baseline x86-64, AVX2 + FMA, and AVX2 + FMA with the
# AVX-512F float32 general power
CPU_ISAS = ["default", "avx2", "avx512"]


def use_cpu_isa(monkeypatch, isa):
    """Make the native op run the row kernels of ``isa`` for one test (ATOM_FAST_CPU_ISA); skip the
    test when this CPU lacks that instruction set."""
    from atom_fast.backends import native

    monkeypatch.setenv("ATOM_FAST_CPU_ISA", isa)
    try:
        got = native.cpu_isa()
    except RuntimeError as exc:
        pytest.skip(f"this CPU cannot run the {isa} row kernels: {exc}")
    assert got == isa


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


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """The tiny 3-class image folder (tests/_data.py) that the CLI tests distil from, written once per
    session, so that the store the CLI prepares from it in the cache above is prepared once. Tests
    only read it."""
    from _data import write_folder_dataset

    return write_folder_dataset(tmp_path_factory.mktemp("folder"))


@pytest.fixture(autouse=True)
def _one_thread(request):
    """One torch thread per test: the tensors and networks here are tiny, two OpenMP threads only
    add synchronization (10-50x slower on a busy 2-core machine), and the second core is left to the
    background commands below. Tests marked ``default_threads`` (the native op's parallel loops) keep
    torch's default."""
    if request.node.get_closest_marker("default_threads"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- commands run in the background (tests/_background.py) -------------------------------------------

from _background import BackgroundRuns  # noqa: E402

_BACKGROUND = BackgroundRuns()


def _skipped(item):
    return any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


# Under pytest-xdist (``-n 2``, the README's command) each worker is a process of its own: the tests
# marked ``slow`` go first, so that the long ones start early and the short ones fill in behind them,
# and a background command runs when its test asks for it, in that test's worker (started with the
# session, it would run once in every worker).
XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ


def pytest_collection_modifyitems(session, config, items):
    """In one process, the tests that read a background command's result run last, so that it has
    the whole run to finish in; under xdist, the slow tests run first."""
    if XDIST_WORKER:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept
        return
    marked = [item for item in items if item.get_closest_marker("background")]
    if marked:
        items[:] = [item for item in items if not item.get_closest_marker("background")] + marked


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    if not session.config.option.collectonly and not XDIST_WORKER:
        for item in session.items:
            marker = item.get_closest_marker("background")
            if marker and not _skipped(item):
                _BACKGROUND.add(marker)
        _BACKGROUND.start()
    yield


def pytest_sessionfinish(session):
    _BACKGROUND.stop()


def pytest_terminal_summary(terminalreporter):
    lines = _BACKGROUND.summary()
    if lines:
        terminalreporter.write_line("background commands: " + "; ".join(lines))


@pytest.fixture
def background_result(request):
    """The subprocess.CompletedProcess of the command in the test's ``background`` marker."""
    return _BACKGROUND.result(request.node.get_closest_marker("background"))
