"""Long commands that a test only reads the result of (the compile checks of tools/compile_check/),
run in the background while the rest of the suite runs.

A test marked ``@pytest.mark.background(argv, cwd=..., env=..., timeout=...)`` asks for its command's
``subprocess.CompletedProcess`` through the ``background_result`` fixture. conftest.py starts every
such command once per session, when the tests start running, one after another in a thread of this
process; the marked tests run last, so the commands use a core that the other tests (one torch thread
each) leave idle. A command asked for by several tests runs once.
"""

import os
import signal
import subprocess
import threading
import time


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _Job:
    def __init__(self, argv, cwd, env, timeout):
        self.argv, self.cwd, self.env, self.timeout = list(argv), cwd, env, timeout
        self.done = threading.Event()
        self.proc = None
        self.result = None  # a CompletedProcess, or the exception that ended the command
        self.seconds = None


class BackgroundRuns:
    """The session's background commands, keyed by their marker arguments."""

    def __init__(self):
        self._jobs = {}
        self._order = []
        self._thread = None
        self._stopped = False
        self._lock = threading.Lock()

    @staticmethod
    def key(marker):
        kwargs = marker.kwargs
        env = kwargs.get("env")
        return (tuple(marker.args[0]), kwargs.get("cwd"),
                None if env is None else tuple(sorted(env.items())), kwargs.get("timeout"))

    def add(self, marker):
        """Queue the marker's command (before start())."""
        key = self.key(marker)
        if key not in self._jobs:
            self._jobs[key] = _Job(marker.args[0], marker.kwargs.get("cwd"), marker.kwargs.get("env"),
                                   marker.kwargs.get("timeout"))
            self._order.append(key)

    def start(self):
        if self._order and self._thread is None:
            self._thread = threading.Thread(target=self._run_all, name="background-checks", daemon=True)
            self._thread.start()

    def _run_all(self):
        for key in self._order:
            self._run(self._jobs[key])

    def _run(self, job):
        start = time.perf_counter()
        try:
            with self._lock:
                if self._stopped:
                    raise RuntimeError("the test session ended before this command ran")
                # its own process group, so that the compilers it starts end with it
                job.proc = subprocess.Popen(job.argv, cwd=job.cwd, env=job.env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            start_new_session=True)
            try:
                out, err = job.proc.communicate(timeout=job.timeout)
            except subprocess.TimeoutExpired:
                _kill(job.proc)
                job.proc.communicate()
                raise
            job.result = subprocess.CompletedProcess(job.argv, job.proc.returncode, out, err)
        except Exception as exc:  # handed to the test that reads the result
            job.result = exc
        job.seconds = time.perf_counter() - start
        job.done.set()

    def result(self, marker):
        """The command's CompletedProcess; a command the session did not start runs now."""
        key = self.key(marker)
        job = self._jobs.get(key)
        if job is None:
            job = self._jobs[key] = _Job(marker.args[0], marker.kwargs.get("cwd"),
                                         marker.kwargs.get("env"), marker.kwargs.get("timeout"))
            self._run(job)
        job.done.wait()
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result

    def summary(self):
        """'command: N s' for each command that ran."""
        return [f"{' '.join(os.path.basename(a) for a in job.argv[1:])}: {job.seconds:.0f} s"
                for job in self._jobs.values() if job.seconds is not None]

    def stop(self):
        """Kill what still runs (the session ended early: -x, Ctrl-C)."""
        with self._lock:
            self._stopped = True
            for job in self._jobs.values():
                if job.proc is not None and job.proc.poll() is None:
                    _kill(job.proc)
        if self._thread is not None:
            self._thread.join(30)
