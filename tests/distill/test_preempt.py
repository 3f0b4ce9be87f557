"""A SIGTERM or SIGINT during the distillation loses nothing: the run stops after the iteration it is
in (every process after the same one), rank 0 checkpoints there, the process exits 143 / 130 with one
line, and the same command with --resume ends with the images of an uninterrupted run. A second
signal ends the process at once; outside the loop the handlers are the caller's.

Runs are tiny (an 8x8 image folder of 3 classes, a ConvNet of width 8) and --checkpoint-every is
beyond --iterations, so the only checkpoint is the one the signal made. The signal is sent once the
progress bar on stderr shows a few iterations done; ITERATIONS is long enough that it lands mid-run.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from atom_fast.distill import cli, distributed, loop, preempt, session

from _data import write_folder_dataset
from _procs import child_env, free_port

ITERATIONS = 300  # a few ms each: the signal lands after about 3, the run would end after ~2 s more


def _args(folder, out, *extra, iterations=ITERATIONS, log_every=1):
    return ["--dataset", "folder", "--data-path", str(folder), "--ipc", "1", "--batch-real", "4",
            "--width", "8", "--iterations", str(iterations), "--eval-models", "1", "--eval-epochs", "1",
            "--no-baseline", "--log-every", str(log_every), "--checkpoint-every", "100000",
            "--dist-timeout", "60", "--device", "cpu", "--out", str(out), *extra]


def _single(*args):
    return [sys.executable, "-m", "atom_fast.distill", *args]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "-m", "atom_fast.distill", *args]


class _Run:
    """A CLI process whose stderr is read as it comes (the progress bar ends lines with \\r)."""

    def __init__(self, command, env=None):
        self.proc = subprocess.Popen(command, env=env or child_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._chunks = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self._chunks.append(chunk)

    @property
    def err(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for_iterations(self, n, total=ITERATIONS, timeout=300):
        """Until the progress bar shows at least ``n`` of ``total`` iterations done."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = [int(d) for d in re.findall(rf"(\d+)/{total} \[", self.err)]
            if done and max(done) >= n:
                return max(done)
            assert self.proc.poll() is None, f"the run ended before iteration {n}:\n{self.err[-3000:]}"
            time.sleep(0.005)
        raise AssertionError(f"no iteration {n} within {timeout} s:\n{self.err[-3000:]}")

    def finish(self, timeout=120):
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(10)
        return rc, self.err.replace("\r", "\n")


def _stopped_lines(err):
    # the progress bar leaves its line open: under torchrun another rank's line may follow it there
    return re.findall(r"atom-fast: stopped by .*", err)


def _check_stopped(err, out, name, processes=1):
    """The one line per process (the same on each), and the checkpoint at the iteration it names."""
    lines = _stopped_lines(err)
    assert len(lines) == processes and len(set(lines)) == 1, err[-3000:]
    m = re.fullmatch(rf"atom-fast: stopped by {name} at iteration (\d+) of {ITERATIONS}; checkpoint "
                     rf"written to (.+)\. Rerun the same command with --resume to continue it\.",
                     lines[0])
    assert m, lines[0]
    iteration = int(m.group(1))
    assert 3 <= iteration < ITERATIONS
    assert m.group(2) == str(out / session.CHECKPOINT)
    state = torch.load(out / session.CHECKPOINT)
    assert state["iteration"] == iteration
    # the losses not yet reported at the signal were flushed into it
    assert [i for i, _ in state["losses"]] == list(range(1, iteration + 1))
    assert state["world_size"] == processes
    # no evaluation, no results, nothing else left behind (the lock released)
    assert sorted(p.name for p in out.iterdir()) == [session.CHECKPOINT], list(out.iterdir())
    return iteration


def _images(out):
    return torch.load(Path(out) / session.SYNTHETIC)["images"]


# -- the CLI --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_the_iteration_reached_and_resume_matches_an_uninterrupted_run(folder,
                                                                                          tmp_path):
    out = tmp_path / "stopped"
    run = _Run(_single(*_args(folder, out)))
    run.wait_for_iterations(3)
    run.proc.send_signal(signal.SIGTERM)
    rc, err = run.finish()
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err
    iteration = _check_stopped(err, out, "SIGTERM")

    resumed = subprocess.run(_single(*_args(folder, out, "--resume")), env=child_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / session.CHECKPOINT} at iteration {iteration}" in resumed.stderr
    whole = subprocess.run(_single(*_args(folder, tmp_path / "whole")), env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert torch.equal(_images(out), _images(tmp_path / "whole"))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_iteration(folder, tmp_path):
    """torchrun forwards the signal to each rank; they agree on the iteration and resume together.
    The loss is reported every 5 iterations here, so the stop also flushes unreported ones."""
    out = tmp_path / "stopped"
    run = _Run(_torchrun(*_args(folder, out, log_every=5)))
    run.wait_for_iterations(5)
    run.proc.send_signal(signal.SIGTERM)  # to the launcher only
    rc, err = run.finish()
    assert rc != 0, err[-3000:]
    _check_stopped(err, out, "SIGTERM", processes=2)  # one line per rank, the same iteration

    resumed = subprocess.run(_torchrun(*_args(folder, out, "--resume", log_every=5)), env=child_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run(_torchrun(*_args(folder, tmp_path / "whole", log_every=5)), env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert torch.equal(_images(out), _images(tmp_path / "whole"))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_iteration(folder, tmp_path):
    """Only rank 1 gets SIGTERM (the ranks started by hand, no torchrun): rank 0 learns it from the
    per-iteration flag, stops after the same iteration and writes the checkpoint."""
    out, port = tmp_path / "stopped", free_port()
    runs = []
    for rank in range(2):
        env = child_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        runs.append(_Run(_single(*_args(folder, out)), env=env))
    try:
        runs[0].wait_for_iterations(3)
        runs[1].proc.send_signal(signal.SIGTERM)
        finished = [run.finish() for run in runs]
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    assert [rc for rc, _ in finished] == [143, 143], finished[0][1][-3000:] + finished[1][1][-3000:]
    _check_stopped(finished[0][1] + finished[1][1], out, "SIGTERM", processes=2)


def test_sigint_stops_after_the_iteration_it_came_in(folder, tmp_path, monkeypatch, capsys):
    """In this process, the signal sent from inside iteration 2 (0-based): the run stops after it,
    exits 130, and the caller's handlers are back."""
    out = tmp_path / "run"
    step = loop.Distiller.step

    def step_then_signal(self, iteration):
        loss = step(self, iteration)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(loop.Distiller, "step", step_then_signal)
    before = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    assert cli.main(_args(folder, out, "--no-progress", log_every=2)) == 130
    assert {s: signal.getsignal(s) for s in preempt.SIGNALS} == before
    err = capsys.readouterr().err
    assert _check_stopped(err, out, "SIGINT") == 3


# -- the signal handling ---------------------------------------------------------------------------


def _deliver(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler between bytecodes, in the main thread


def test_watch_records_the_first_signal_and_restores_the_handlers():
    calls = []

    def mine(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with preempt.Watch() as watch:
            assert watch.installed and watch.requested() is None
            assert signal.getsignal(signal.SIGTERM) is not mine
            _deliver(signal.SIGINT)
            assert watch.requested() == signal.SIGINT
        assert watch.requested() == signal.SIGINT and not watch.installed
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is sigint
        _deliver(signal.SIGTERM)
        assert calls == [signal.SIGTERM]  # the caller's handler again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert preempt.exit_code(signal.SIGTERM) == 143 and preempt.exit_code(signal.SIGINT) == 130


def test_watch_leaves_an_ignored_signal_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup
    try:
        with preempt.Watch() as watch:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            _deliver(signal.SIGTERM)
            assert watch.requested() is None
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_watch_outside_the_main_thread_installs_nothing():
    seen = {}

    def body():
        before = signal.getsignal(signal.SIGTERM)
        with preempt.Watch() as watch:
            seen["installed"] = watch.installed
            seen["same"] = signal.getsignal(signal.SIGTERM) is before

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"installed": False, "same": True}


SECOND_SIGNAL = """
import os, signal, sys, time
from atom_fast.distill import preempt
with preempt.Watch() as watch:
    for _ in range(2):  # the same request delivered twice (SLURM and torchrun): one
        os.kill(os.getpid(), signal.{first})
        time.sleep(0.01)  # each handled on its own, not merged into one pending signal
    print("recorded", watch.requested(), flush=True)
    time.sleep(60)  # an iteration that would go on for a minute
print("finished the iteration", flush=True)
"""


@pytest.mark.parametrize("first,second", [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT")])
def test_a_second_signal_ends_the_process_at_once(first, second):
    proc = subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL.format(first=first)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["recorded", str(int(getattr(signal, first)))]
        time.sleep(preempt.DUPLICATE_S + 0.3)  # past the window of a duplicate delivery
        sent = time.time()
        proc.send_signal(getattr(signal, second))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.time() - sent < 10, "the second signal did not end the process at once"
    assert proc.returncode == -getattr(signal, second), (proc.returncode, err)
    assert "finished the iteration" not in out


@pytest.mark.slow
def test_the_stop_flag_over_a_gloo_side_group(tmp_path):
    """With NCCL the stop flag goes over a gloo group made once; here the default group is gloo and
    the Context claims NCCL, so that path runs on this CPU."""
    script = tmp_path / "flag.py"
    script.write_text(
        "import dataclasses, torch\n"
        "from atom_fast.distill import distributed as dist\n"
        "ctx = dist.initialize(torch.device('cpu'), 60)\n"
        "nccl = dataclasses.replace(ctx, backend='nccl')\n"
        "assert dist.cpu_group(ctx) is None\n"
        "flags = [dist.max_int(nccl, 15 if ctx.rank == 1 and i >= 2 else 0, 'flag') for i in range(4)]\n"
        "assert dist.cpu_group(nccl) is dist.cpu_group(nccl) is not None\n"
        "assert dist.max_int(ctx, ctx.rank, 'rank') == 1\n"
        "print(f'rank {ctx.rank}: {flags}', flush=True)\n"
        "dist.shutdown(ctx)\n")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script)], env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: [0, 0, 15, 15]" in res.stdout, res.stdout
    assert distributed.max_int(distributed.Context(), 7, "one process") == 7
