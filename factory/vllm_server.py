"""A vLLM OpenAI-compatible server in a child process, for as long as a `with` block lasts.

The server runs in its own process group, so stopping it also stops the engine-core and
worker processes vLLM forks; its output goes to a log file whose tail is put into the
error when it fails to start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger("specmill.factory.vllm_server")

# The `vllm` console script of the CPU build fails to start; the module entry point works
# for both builds.
_ENTRY_MODULE = "vllm.entrypoints.openai.api_server"


class VllmServerError(RuntimeError):
    """The server did not start, or died; the message ends with the tail of its log."""


@dataclass(kw_only=True, slots=True)
class VllmServerConfig:
    model: Path
    # Passed through verbatim after `--model/--host/--port`, e.g. ("--dtype", "float32").
    extra_args: tuple[str, ...] = ()
    # Set on top of this process's environment, e.g. {"VLLM_CPU_KVCACHE_SPACE": "1"}.
    env: Mapping[str, str] = field(default_factory=dict)
    # The name requests must give as `model`; None serves it under the directory path.
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    # None picks a free port when the server starts.
    port: int | None = None
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    # None writes to a new file under the system temp dir; it is kept after the server stops.
    log_path: Path | None = None

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        self.extra_args = tuple(str(a) for a in self.extra_args)
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model must be a Hugging Face model directory with a config.json, got {self.model}")
        for flag in ("--model", "--host", "--port", "--served-model-name"):
            if any(a == flag or a.startswith(flag + "=") for a in self.extra_args):
                raise ValueError(f"extra_args must not contain {flag}: set the config field instead")
        bad_env = {k: v for k, v in self.env.items() if not isinstance(v, str)}
        if bad_env:
            raise ValueError(f"env values must be strings, got {bad_env}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535 or None for a free one, got {self.port}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be positive")


class VllmServer:
    """`with VllmServer(config) as server: httpx.post(server.base_url + "/v1/completions", ...)`."""

    def __init__(self, config: VllmServerConfig) -> None:
        self.config = config
        self.port = config.port
        self.log_path = config.log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise VllmServerError("the server has not been started: no port chosen yet")
        return f"http://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The API server's pid, which is also its process group id."""
        if self._proc is None:
            raise VllmServerError("the server is not running")
        return self._proc.pid

    @property
    def model_name(self) -> str:
        """What to send as `model` in requests."""
        return self.config.served_model_name or str(self.config.model)

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            raise VllmServerError("start() called twice; stop() the running server first")
        cfg = self.config
        if self.port is None:
            self.port = _free_port(cfg.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"specmill-vllm-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        argv = [sys.executable, "-m", _ENTRY_MODULE, "--model", str(cfg.model),
                "--host", cfg.host, "--port", str(self.port)]
        if cfg.served_model_name:
            argv += ["--served-model-name", cfg.served_model_name]
        argv += list(cfg.extra_args)
        log.info("starting vLLM server on port %d for %s (log: %s)", self.port, cfg.model, self.log_path)
        log.debug("vLLM command: %s", " ".join(argv))
        with open(self.log_path, "ab") as log_file:
            # Own session => own process group, so stop() reaches the engine and worker children too.
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                          env={**os.environ, **cfg.env}, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("vLLM server did not stop within %.0f s of SIGTERM; killing it", self.config.stop_timeout_s)
        # The engine core and workers may outlive the API process by a moment; they hold cores and memory.
        deadline = time.monotonic() + self.config.stop_timeout_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=self.config.stop_timeout_s)
        log.info("vLLM server on port %s stopped", self.port)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _wait_healthy(self) -> None:
        import httpx

        assert self._proc is not None
        started = time.monotonic()
        url = f"{self.base_url}/health"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VllmServerError(f"vLLM server exited with code {code} while starting; "
                                      f"log {self.log_path} ends with:\n{self.log_tail()}")
            elapsed = time.monotonic() - started
            if elapsed > self.config.startup_timeout_s:
                raise VllmServerError(f"vLLM server was not healthy after {self.config.startup_timeout_s:.0f} s "
                                      f"(raise startup_timeout_s if the machine is slow); log {self.log_path} "
                                      f"ends with:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=5.0).status_code == 200:
                    log.info("vLLM server ready at %s after %.1f s", self.base_url, elapsed)
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(1.0)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
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
