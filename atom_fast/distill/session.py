"""A distillation run's life: its output folder (checked, locked, written atomically), checkpoints,
resume, the non-finite stop and the stop on a signal. The pipelines (``pipelines.py``) run the
distillation through :func:`distill` and write into :class:`OutputDir`; what the files hold is
``artifacts.py``'s.

Promises, each tested (tests/distill/test_session.py):
- An output folder that holds an earlier run's checkpoint or results is never touched by a new run
  unless it says ``--resume`` (continue it) or ``--overwrite`` (replace it).
- ``--out`` is checked for writability before any data is loaded; it is created only once the data
  loaded.
- One run at a time per folder: an exclusive lock file (``.atom-fast.lock`` with the pid); a lock
  left by a dead process is taken over.
- Every file is written atomically (temporary file, fsync, rename); temporaries left by a killed run
  are removed by the next one. ``synthetic.pt`` and ``results.json`` carry the same ``run_id``, and a
  run that may write removes the previous results first, so the folder never pairs the images of one
  run with the results of another.
- A checkpoint that cannot be read, or a write that fails (a full disk), ends the run with a one-line
  error naming the file; the last good checkpoint stays.
- A SIGTERM or SIGINT during the distillation (``preempt.py``) stops every process after the same
  iteration; rank 0 checkpoints there and the run ends with :class:`Preempted` (exit status 128 + the
  signal, no evaluation, no results), which ``--resume`` continues. A second signal ends it at once
  (tests/distill/test_preempt.py).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

import torch

from atom_fast.distill import distributed as dist
from atom_fast.distill import preempt
from atom_fast.distill.loop import Distiller, DistillConfig, NonFiniteLossError
from atom_fast.distill.output import write_atomic

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
SYNTHETIC = "synthetic.pt"
PICTURE = "synthetic.png"
PLOT = "accuracy.png"
LOCK = ".atom-fast.lock"
# what a run leaves in --out (the formats: artifacts.py); a fresh run refuses a folder holding any of
# the first three
RUN_FILES = (CHECKPOINT, RESULTS, SYNTHETIC, PICTURE, PLOT)
# settings a resumed run may change: the length, and the learning rate (to recover from a blow-up)
RESUMABLE = ("iterations", "lr_img")


class SessionError(RuntimeError):
    """A run cannot start or go on for a reason the user can fix (one line, names the file)."""


class Preempted(SessionError):
    """A signal stopped the run after a checkpoint at ``iteration``; ``exit_code`` is the shell's
    status for the signal (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, message: str, signum: int, iteration: int):
        super().__init__(message)
        self.signum = signum
        self.iteration = iteration
        self.exit_code = preempt.exit_code(signum)


# --------------------------------------------------------------------------------------------------
# the output folder
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputDir:
    """``--out``: checked before data loads, created and locked after, released at exit."""

    def __init__(self, path, resume: bool, overwrite: bool):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self._locked = False

    def file(self, name: str) -> Path:
        return self.path / name

    # -- before any data is loaded --------------------------------------------------------------
    def check(self) -> None:
        """Fail fast: the folder can be created and written, and holds no run we would clobber."""
        p = self.path
        if p.exists():
            if not p.is_dir():
                raise SessionError(f"--out {p} exists and is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise SessionError(f"--out {p} is not writable")
            self._check_earlier_run()
            return
        parent = p
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise SessionError(f"--out {p}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SessionError(f"--out {p} cannot be created: {parent} is not writable")

    def _check_earlier_run(self) -> None:
        found = [n for n in (CHECKPOINT, RESULTS, SYNTHETIC) if self.file(n).exists()]
        if found and not (self.resume or self.overwrite):
            raise SessionError(f"--out {self.path} holds an earlier run ({', '.join(found)}); pass "
                               "--resume to continue it or --overwrite to replace it")

    # -- once the inputs are known good ----------------------------------------------------------
    def open(self) -> None:
        """Create the folder, take the lock, clean a killed run's temporaries, re-check, clear stale
        outputs of a run we are allowed to replace."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(f"--out {self.path} cannot be created: {exc.strerror}") from None
        self._lock()
        for tmp in self.path.glob(".*.tmp*"):
            if any(tmp.name.startswith(f".{n}.") for n in RUN_FILES):
                tmp.unlink(missing_ok=True)
        self._check_earlier_run()  # again, now under the lock
        keep = {CHECKPOINT} if self.resume else set()
        if self.resume or self.overwrite:
            for name in RUN_FILES:
                if name not in keep:
                    self.file(name).unlink(missing_ok=True)

    def _lock(self) -> None:
        lock = self.file(LOCK)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise SessionError(f"--out {self.path} is in use by another run (pid {pid}, "
                                       f"lock {lock}); wait for it or choose another --out") from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except OSError as exc:
                raise SessionError(f"--out {self.path} is not writable: {exc.strerror}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._locked = True
            return
        raise SessionError(f"could not take the lock {lock}")

    def release(self) -> None:
        if self._locked:
            self._locked = False
            try:
                if self.file(LOCK).read_text().strip() == str(os.getpid()):
                    self.file(LOCK).unlink()
            except OSError:
                pass

    def write_with(self, name: str, writer: Callable[[Path], object]):
        """Atomic write of a file produced by ``writer(temporary_path)`` (a PNG, a plot): the file
        appears whole or not at all. Returns what ``writer`` returned; a writer that writes nothing
        (returns None and leaves no file) leaves nothing."""
        final = self.file(name)
        # the suffix stays last: PIL and matplotlib choose the format from it
        tmp = self.path / f".{name}.{os.getpid()}.tmp{final.suffix}"
        try:
            result = writer(tmp)
            if tmp.exists():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            return result
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise SessionError(f"could not write {final}: {reason}") from None
        finally:
            if tmp.exists():
                tmp.unlink()

    def write(self, name: str, obj, as_json: bool = False) -> None:
        """Atomic write; a failure (e.g. a full disk) is a one-line SessionError."""
        try:
            write_atomic(self.file(name), obj, as_json=as_json)
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise SessionError(f"could not write {self.file(name)}: {reason}") from None


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by this driver, or a SessionError saying what is wrong with the file."""
    fix = "delete it, or pass --overwrite to start afresh"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, not a torch file, unpicklable...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SessionError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: "
                           f"{first[:200]}); {fix}") from None
    keys = ("iteration", "elapsed_s", "losses", "run", "distiller")
    if not isinstance(state, dict) or any(k not in state for k in keys) or \
            not isinstance(state["distiller"], dict) or "syn" not in state["distiller"]:
        raise SessionError(f"--resume: {path} is not an atom-fast checkpoint (it lacks "
                           f"{', '.join(keys)}); {fix}")
    return state


def check_compatible(saved: dict, current: dict) -> None:
    differ = [k for k in current if k not in RESUMABLE and saved.get(k) != current[k]]
    if differ:
        raise SessionError("--resume: the checkpoint was made with different settings: " +
                           ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in differ))


# --------------------------------------------------------------------------------------------------
# the distillation
# --------------------------------------------------------------------------------------------------


def gather_state(ctx: dist.Context, distiller: Distiller) -> Optional[dict]:
    """The state of every class on rank 0 (synthetic images and momentum in class order)."""
    parts = dist.gather_to_main(ctx, distiller.state_dict(), "gathering the synthetic images")
    if parts is None:
        return None
    momentum = [p["momentum"] for p in parts]
    return {"syn": torch.cat([p["syn"] for p in parts]),
            "syn_labels": torch.cat([p["syn_labels"] for p in parts]),
            "momentum": None if any(m is None for m in momentum) else torch.cat(momentum),
            "config": parts[0]["config"]}


def distill(data, config: DistillConfig, device: torch.device, out: OutputDir, identity: dict, *,
            resume: bool, checkpoint_every: int, log_every: int, progress: bool,
            log: Callable[[str], None], ctx: dist.Context = dist.Context()) -> dict:
    """Run (or resume) a distillation of ``data`` (a :mod:`atom_fast.distill.real` run data: this
    process reads its own classes' images only); rank 0 gets the whole synthetic set back.

    ``identity``: what the pixels depend on beyond ``config`` (dataset, path, ZCA...), compared on
    resume. Checkpoints go to ``out`` every ``checkpoint_every`` iterations (rank 0 writes them).
    A SIGTERM or SIGINT during the loop raises :class:`Preempted` on every process after the
    checkpoint of the iteration they stopped at.
    """
    classes = ctx.classes(data.num_classes)
    distiller = Distiller(data.train_source(device, classes), None, data.num_classes, config, device,
                          classes=classes)
    try:
        return _distill(distiller, ctx, out, identity, resume=resume, checkpoint_every=checkpoint_every,
                        log_every=log_every, progress=progress, log=log)
    finally:
        distiller.close()


def _distill(distiller: Distiller, ctx: dist.Context, out: OutputDir, identity: dict, *, resume: bool,
             checkpoint_every: int, log_every: int, progress: bool, log: Callable[[str], None]) -> dict:
    c = distiller.config
    ckpt = out.file(CHECKPOINT)
    start, elapsed, losses = 0, 0.0, []
    state, error = None, None
    if ctx.is_main and resume:
        if ckpt.exists():
            try:
                state = load_checkpoint(ckpt)
                check_compatible({**state["distiller"]["config"], **state["run"]},
                                 {**asdict(c), **identity})
                if state["iteration"] > c.iterations:
                    raise SessionError(f"--resume: the checkpoint is at iteration {state['iteration']}, "
                                       f"past --iterations {c.iterations}")
            except SessionError as exc:
                error = exc
        else:
            log(f"--resume: no checkpoint at {ckpt}; starting from scratch")
    dist.agree(ctx, error, "checking the checkpoint")
    state = dist.broadcast_from_main(ctx, state, "sharing the checkpoint")
    if state is not None:
        distiller.load_state_dict(state["distiller"])
        start, elapsed, losses = state["iteration"], state["elapsed_s"], list(state["losses"])
        log(f"resuming from {ckpt} at iteration {start}")
    last_good = start if state is not None else None

    def stop_message(what: str) -> str:
        kept = f"{ckpt} (iteration {last_good})" if last_good is not None else "none was written yet"
        return (f"{what}; stopping. The last good checkpoint is kept: {kept}. Resume it with a lower "
                f"--lr-img (--resume --lr-img ...).")

    def checkpoint(iteration: int, seconds: float) -> None:
        full = gather_state(ctx, distiller)
        error = None
        if ctx.is_main:
            if not bool(torch.isfinite(full["syn"]).all()):  # a blow-up with a finite loss
                error = NonFiniteLossError(stop_message(
                    f"the synthetic images hold non-finite values at iteration {iteration}"))
            else:
                try:
                    out.write(CHECKPOINT, {"iteration": iteration, "elapsed_s": seconds,
                                           "losses": losses, "run": identity, "distiller": full,
                                           "world_size": ctx.world_size})
                except SessionError as exc:
                    error = SessionError(f"{exc}; the previous checkpoint is intact" +
                                         (f" (iteration {last_good})" if last_good is not None
                                          else ""))
        dist.agree(ctx, error, "checkpointing")

    from tqdm.auto import tqdm

    bar = tqdm(total=c.iterations, initial=start, disable=not (progress and ctx.is_main), unit="it",
               desc=f"{c.method} ipc{c.ipc}", dynamic_ncols=True, file=sys.stderr)
    pending: List[torch.Tensor] = []
    session_start = time.perf_counter()
    # the handlers are ours only while the loop runs: the caller's come back after it
    with preempt.Watch() as watch, contextlib.closing(bar):
        for it in range(start, c.iterations):
            pending.append(distiller.step(it))
            done = it + 1
            # processes get a signal at slightly different times: all of them stop after the same
            # iteration, the first at which any of them had one (no communication in one process)
            stop = dist.max_int(ctx, watch.requested() or 0, "agreeing whether to stop")
            if not stop and done % log_every and done % checkpoint_every and done != c.iterations:
                continue
            # one host sync (and one small all_reduce) per --log-every iterations: the global loss
            values = dist.all_reduce_sum(ctx, torch.stack(pending), "summing the loss").tolist()
            pending.clear()
            for j, v in enumerate(values):
                if not math.isfinite(v):
                    raise NonFiniteLossError(stop_message(
                        f"the distillation loss became {v} at iteration {done - len(values) + j + 1}"))
            losses.extend((done - len(values) + j + 1, v) for j, v in enumerate(values))
            bar.update(len(values))
            bar.set_postfix(loss=f"{values[-1]:.4g}")
            if stop or done % checkpoint_every == 0 or done == c.iterations:
                checkpoint(done, elapsed + time.perf_counter() - session_start)
                last_good = done
            if stop:
                raise Preempted(f"stopped by {preempt.name(stop)} at iteration {done} of "
                                f"{c.iterations}; checkpoint written to {ckpt}. Rerun the same "
                                f"command with --resume to continue it.", stop, done)
    session_s = time.perf_counter() - session_start
    if start >= c.iterations:
        checkpoint(start, elapsed)
    full = gather_state(ctx, distiller)
    return {"config": asdict(c), "images": full["syn"] if full else None,
            "labels": full["syn_labels"] if full else None,
            "distill_s": elapsed + session_s, "session_s": session_s,
            "iterations_run": c.iterations - start, "losses": losses}


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
