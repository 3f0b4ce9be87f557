"""Multi-process distillation on this CPU with gloo (``torchrun --nproc-per-node 2``).

The classes are sharded over the processes; with instance norm the synthetic images must equal
those of a single process with the same seed (to float rounding), resuming must work with another
number of processes, and a process that dies must stop the others with a one-line error instead of
a hang. Kept small: MNIST, a narrow ConvNet, a few iterations.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atom_fast.distill.distributed import shard_classes

from _data import write_folder_dataset
from _procs import child_env, free_port

COMMON = ["--dataset", "mnist", "--ipc", "2", "--batch-real", "16", "--width", "16",
          "--eval-models", "2", "--eval-epochs", "1", "--no-baseline", "--no-progress",
          "--log-every", "1", "--checkpoint-every", "2", "--dist-timeout", "60"]


def _single(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "atom_fast.distill", *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def _torchrun(n, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--master-port", str(free_port()), "-m", "atom_fast.distill", *args],
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def _images(out):
    return torch.load(Path(out) / "synthetic.pt")["images"]


def _close(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_shard_classes_covers_every_class_once():
    for K, W in ((10, 2), (10, 3), (7, 7), (1000, 8)):
        parts = [shard_classes(K, W, r) for r in range(W)]
        assert [k for p in parts for k in p] == list(range(K))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="3 processes but only 2 classes"):
        shard_classes(2, 3, 0)


@pytest.mark.slow
def test_two_processes_make_the_images_of_one_and_resume_across_world_sizes(tmp_path):
    one = _single(*COMMON, "--iterations", "4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, *COMMON, "--iterations", "4", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert _close(_images(tmp_path / "one"), _images(tmp_path / "two")) <= 1e-5
    import json
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo"}
    # the printed / recorded loss is the global one
    for (i, a), (j, b) in zip(r1["losses"], r2["losses"]):
        assert i == j and abs(a - b) <= 1e-5 * abs(a)
    # evaluation models were spread over the ranks and gathered: the same accuracies
    assert r2["accuracies"] == pytest.approx(r1["accuracies"], abs=1e-9)
    # two processes for 2 iterations, then one process resumes to 4: the same images (only the
    # images are compared, so neither leg evaluates: the evaluation settings are not part of a resume)
    half = _torchrun(2, *COMMON, "--iterations", "2", "--eval-models", "0", "--out", str(tmp_path / "mixed"))
    assert half.returncode == 0, half.stderr[-3000:]
    rest = _single(*COMMON, "--iterations", "4", "--eval-models", "0", "--resume", "--out", str(tmp_path / "mixed"))
    assert rest.returncode == 0, rest.stderr
    assert "resuming from" in rest.stderr
    assert _close(_images(tmp_path / "one"), _images(tmp_path / "mixed")) <= 1e-5


@pytest.mark.slow
def test_more_processes_than_classes_is_a_clear_error(tmp_path):
    data = write_folder_dataset(tmp_path / "data", classes=("a", "b"), train=4, test=1)
    res = _torchrun(3, "--dataset", "folder", "--data-path", str(data), "--ipc", "1",
                    "--batch-real", "2", "--width", "4", "--iterations", "1", "--no-progress",
                    "--out", str(tmp_path / "out"), "--dist-timeout", "60", timeout=300)
    assert res.returncode != 0
    assert "atom-fast: error: 3 processes but only 2 classes" in res.stderr
    assert "Traceback" not in res.stderr.split("atom-fast: error:")[0][-2000:]


@pytest.mark.slow
def test_a_dead_process_stops_the_others_with_a_one_line_error(tmp_path):
    """Rank 1 is killed mid-run; rank 0 must stop within the timeout with a clear message."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = child_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "atom_fast.distill", *COMMON, "--iterations", "400",
             "--dist-timeout", "30", "--out", str(tmp_path / "out")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        # wait until rank 0 is distilling (it logs the data line after joining the group)
        deadline = time.time() + 240
        line = ""
        while "processes" not in line and time.time() < deadline:
            line = procs[0].stderr.readline()
            assert line or procs[0].poll() is None, "rank 0 ended early"
        time.sleep(2)
        procs[1].send_signal(signal.SIGKILL)
        start = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    assert waited < 60
    lines = [x for x in err.splitlines() if x.startswith("atom-fast: error:")]
    assert len(lines) == 1 and "another process probably died" in lines[0], err[-3000:]
    assert "Traceback" not in err
