"""A run never loses work: the output folder, the lock, atomic and consistent outputs, one-line errors.

Each test repeats a probe of a hostile user against the CLI and fails on the code before session.py:
an earlier run clobbered, a late discovery of an unwritable --out, torn or mismatched outputs, two
runs in one folder, temporaries left behind, raw tracebacks.
"""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from atom_fast.distill import cli, pipelines, report, session
from atom_fast.distill.output import write_atomic

from _data import write_folder_dataset


def _cli(folder, out, *extra):
    args = ["--dataset", "folder", "--data-path", str(folder), "--ipc", "1", "--batch-real", "4",
            "--width", "8", "--iterations", "4", "--eval-models", "1", "--eval-epochs", "2",
            "--checkpoint-every", "2", "--log-every", "1", "--no-progress", "--no-baseline",
            "--out", str(out), *extra]
    return cli.main(args)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("atom-fast: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def no_data_load(monkeypatch):
    """Fail the test if the run gets as far as loading data."""
    def boom(*a, **k):
        raise AssertionError("the data was loaded before the check")
    monkeypatch.setattr(pipelines, "load_data", boom)  # the store or the in-memory dataset


# -- an earlier run is never clobbered ----------------------------------------------------------------


def test_a_fresh_run_refuses_a_folder_with_an_earlier_run(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(folder, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"checkpoint.pt", "results.json", "synthetic.pt", "synthetic.png"} <= set(before)
    capsys.readouterr()
    assert _cli(folder, out) == 1
    _one_line_error(capsys, "--resume", "--overwrite", "checkpoint.pt")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    # results alone (no checkpoint) are protected too
    (out / "checkpoint.pt").unlink()
    assert _cli(folder, out) == 1
    _one_line_error(capsys, "results.json")
    # --overwrite replaces it
    assert _cli(folder, out, "--overwrite", "--iterations", "2") == 0
    assert json.loads((out / "results.json").read_text())["iterations"] == 2
    assert _cli(folder, out, "--resume", "--overwrite") == 1
    _one_line_error(capsys, "contradict")


def test_an_unwritable_out_fails_before_any_data_loads(tmp_path, capsys, no_data_load):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, needle in ((a_file, "not a directory"), (a_file / "sub", "not a directory"),
                        ("/dev/null", "not a directory")):
        assert cli.main(["--dataset", "mnist", "--out", str(out), "--no-progress"]) == 1
        _one_line_error(capsys, str(out), needle)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_out_fails_before_any_data_loads(tmp_path, capsys, no_data_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert cli.main(["--dataset", "mnist", "--out", str(ro / "run"), "--no-progress"]) == 1
    _one_line_error(capsys, "not writable")


def test_a_data_error_leaves_no_out_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["--dataset", "cifar10", "--data-path", str(tmp_path / "nothing"),
                     "--out", str(out), "--no-progress"]) == 1
    assert not out.exists()


def test_backend_errors_come_before_the_data(tmp_path, capsys, no_data_load):
    import atom_fast.backends

    if atom_fast.backends.triton_available() and atom_fast.backends.triton_interpreted():
        pytest.skip("Triton is interpreted in this process (tests/conftest.py): it runs on CPU")
    assert cli.main(["--dataset", "mnist", "--backend", "triton", "--device", "cpu",
                     "--out", str(tmp_path / "t"), "--no-progress"]) == 1
    _one_line_error(capsys, "--backend triton")


# -- consistent, atomic outputs ----------------------------------------------------------------------


def test_outputs_share_a_run_id_and_an_evaluation_crash_leaves_no_stale_results(folder, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    assert _cli(folder, out) == 0
    first = json.loads((out / "results.json").read_text())["run_id"]
    assert torch.load(out / "synthetic.pt")["run_id"] == first

    def crash(*a, **k):
        raise RuntimeError("evaluation died")

    monkeypatch.setattr(report, "evaluate", crash)
    with pytest.raises(RuntimeError, match="evaluation died"):
        cli.main(["--dataset", "folder", "--data-path", str(folder), "--ipc", "1", "--batch-real", "4",
                  "--width", "8", "--iterations", "2", "--no-progress", "--no-baseline",
                  "--out", str(out), "--overwrite"])
    # the new images are complete and loadable; the earlier run's results are gone, not paired
    # with them
    second = torch.load(out / "synthetic.pt")["run_id"]
    assert second != first
    assert not (out / "results.json").exists()
    assert not list(out.glob(".*.tmp*"))
    assert not (out / session.LOCK).exists()  # released on the way out


def test_temporaries_of_a_killed_write_are_removed_by_the_next_run(folder, tmp_path):
    out = tmp_path / "run"
    assert _cli(folder, out) == 0
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (out / ".results.json.x.tmp").write_bytes(b"{")
    (out / ".synthetic.png.123.tmp.png").write_bytes(b"half a picture")
    (out / "notes.txt").write_text("mine")  # not ours: kept
    assert _cli(folder, out, "--resume") == 0
    assert not list(out.glob(".*.tmp*"))
    assert (out / "notes.txt").read_text() == "mine"


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    write_atomic(path, {"v": 1})

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, {"v": 2})
    assert torch.load(path) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(folder, tmp_path,
                                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    real_write = session.write_atomic
    calls = []

    def second_checkpoint_fails(path, obj, as_json=False):
        calls.append(path.name)
        if path.name == "checkpoint.pt" and calls.count("checkpoint.pt") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, obj, as_json=as_json)

    monkeypatch.setattr(session, "write_atomic", second_checkpoint_fails)
    assert _cli(folder, out) == 1
    _one_line_error(capsys, "checkpoint.pt", "disk is full", "intact (iteration 2)")
    assert torch.load(out / "checkpoint.pt")["iteration"] == 2


# -- one run per folder --------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_is_taken_over(folder, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / session.LOCK).write_text(f"{other.pid}\n")
        assert _cli(folder, out) == 1
        _one_line_error(capsys, "in use by another run", f"pid {other.pid}")
        assert not (out / "checkpoint.pt").exists()
    finally:
        other.kill()
        other.wait()
    # the process is gone: its lock is stale
    assert _cli(folder, out) == 0
    assert not (out / session.LOCK).exists()


# -- a checkpoint that cannot be resumed -----------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    (b"", "not a readable checkpoint"),
    (None, "not a readable checkpoint"),          # truncated (first half of a real one)
    ({"something": "else"}, "not an atom-fast checkpoint"),
    ([1, 2, 3], "not an atom-fast checkpoint"),
])
def test_resume_from_a_bad_checkpoint_is_one_line(folder, tmp_path, capsys, content, needle):
    out = tmp_path / "run"
    assert _cli(folder, out) == 0
    ckpt = out / "checkpoint.pt"
    if content is None:
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[:len(data) // 2])
    elif isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    capsys.readouterr()
    assert _cli(folder, out, "--resume") == 1
    _one_line_error(capsys, str(ckpt), needle)
