"""A vLLM OpenAI-compatible server in a child process, for as long as a `with` block lasts.

The factory's face of `shared.vllm_launch` (which trainer shares): a validated config, a
free port picked at start, and the model name requests must give. The server runs in its
own process group, so stopping it also stops the engine-core and worker processes vLLM
forks; its output goes to a log file whose tail is put into the error when it fails to start.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from shared.vllm_launch import RESERVED_FLAGS, VllmLaunchError, VllmProcess, build_argv, free_port, log_tail


class VllmServerError(VllmLaunchError):
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
        for flag in RESERVED_FLAGS:
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
        self._process: VllmProcess | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise VllmServerError("the server has not been started: no port chosen yet")
        return f"http://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The API server's pid, which is also its process group id."""
        if self._process is None:
            raise VllmServerError("the server is not running")
        return self._process.pid

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
        if self._process is not None:
            raise VllmServerError("start() called twice; stop() the running server first")
        cfg = self.config
        if self.port is None:
            self.port = free_port(cfg.host)
        argv = build_argv(cfg.model, host=cfg.host, port=self.port, served_model_name=cfg.served_model_name,
                          extra_args=cfg.extra_args)
        process = VllmProcess(argv, base_url=self.base_url, env=cfg.env, log_path=self.log_path,
                              startup_timeout_s=cfg.startup_timeout_s, stop_timeout_s=cfg.stop_timeout_s)
        try:
            process.start()
        except VllmLaunchError as e:
            raise VllmServerError(str(e)) from None
        finally:
            self.log_path = process.log_path  # chosen at start when the config left it out
        self._process = process

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def spawn_reaper(pgid: int, *, remove: Path | None = None) -> subprocess.Popen:
    """A process that outlives this one by a moment: when its parent (a Ray actor owning a
    server) is gone, it kills the server's process group and removes `remove` (the server's
    scratch directory), so a restarted actor never finds an orphan holding the cores. Kill the
    reaper when the server is stopped on purpose.

    In a session of its own: Ray 2.60 cleans up after a dead worker by killing the worker's
    process group, which would take the reaper with it and leave the server (in its own session)
    running, orphaned (seen in the capture-worker kill test)."""
    code = ("import os, shutil, signal, sys, time\n"
            "parent, pgid = os.getppid(), int(sys.argv[1])\n"
            "while os.getppid() == parent: time.sleep(0.5)\n"
            "try: os.killpg(pgid, signal.SIGKILL)\n"
            "except ProcessLookupError: pass\n"
            "if len(sys.argv) > 2: shutil.rmtree(sys.argv[2], ignore_errors=True)\n")
    args = [str(pgid)] + ([str(remove)] if remove is not None else [])
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
