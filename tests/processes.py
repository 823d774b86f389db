"""Child processes for tests that start whole process trees (a job with its local Ray, a service)."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(argv: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)` in a session of its own; on timeout
    the whole process group is killed, not only the child: a job's local Ray cluster and workers
    left behind would hold the cores for the rest of the test run and slow every later test."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(argv[2:])} did not end within {timeout:.0f} s; it printed:\n"
                             f"{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (started with start_new_session=True) and everything in its session: Ray's
    workers run in process groups of their own, but in the driver's session."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
