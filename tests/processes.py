"""Child processes for tests that start whole process trees: a job with its local Ray, a service
with its Ray cluster and vLLM servers, the demo with all of these.

Each tree is marked by an environment variable its members inherit (vLLM servers and `ray
start` daemons leave the child's session and process tree, but not its environment), so a
test can kill everything it started: a job or demo left behind after a timeout would hold the
cores and GBs of memory for the rest of the test run and fail every later test."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import psutil

MARKER = "PYTEST_SPECMILL_TREE"


def new_marker() -> str:
    return uuid.uuid4().hex


def start_tree(argv: list[str], *, env: dict[str, str] | None = None, marker: str | None = None,
               **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(argv)` in a session of its own, its tree marked with `marker` (a new one
    if None; several starts may share one, e.g. a service restarted on its own Ray cluster)."""
    marker = marker or new_marker()
    proc = subprocess.Popen(argv, env={**(os.environ if env is None else env), MARKER: marker},
                            start_new_session=True, **popen_kwargs)
    proc.tree_marker = marker
    return proc


def run_tree(argv: list[str], *, timeout: float, env: dict[str, str] | None = None, merge_stderr: bool = False,
             **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)`; on timeout everything the child
    started is killed and the test fails with the end of its output. After a normal exit,
    `.leftovers` names what the child left running, which is then killed."""
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    proc = start_tree(argv, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(argv[2:])} did not end within {timeout:.0f} s; it printed:\n"
                             f"{((out or '') + (err or ''))[-4000:]}") from None
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    done.leftovers = leftovers(proc)  # what it left running (killed now): a clean exit leaves nothing
    kill_tree(proc)
    return done


def marked(marker: str) -> list[psutil.Process]:
    """The processes alive with `marker`, and their descendants: what was started with it,
    directly or not. Descendants count because some rewrite their environment: vLLM's engine
    core and workers set their process titles over it, so their /proc environ reads empty."""
    members: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER) == marker:
                members[p.pid] = p
                members.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return list(members.values())


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (from `start_tree`) and every process it started, wherever they went."""
    kill_marked(proc.tree_marker)
    proc.wait()


def kill_marked(marker: str) -> None:
    for _ in range(3):  # a member may fork while we kill; go again until none is left
        members = marked(marker)
        if not members:
            break
        for p in members:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(members, timeout=10)


def leftovers(proc: subprocess.Popen, grace_s: float = 20.0) -> list[str]:
    """Command lines of the processes `proc` started that are still alive `grace_s` after it ended."""
    deadline = time.monotonic() + grace_s
    while (members := marked(proc.tree_marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for p in members:
        try:
            names.append(" ".join(p.cmdline())[:200])
        except psutil.Error:
            pass
    return names
