"""A vLLM OpenAI-compatible server in a child process, for the trainer's `specmill eval`.

The trainer's face of `shared.vllm_launch` (factory wraps the same launcher; trainer never
imports factory). The server runs in its own process group so stopping it also stops the
engine-core and worker processes vLLM forks; its output goes to a log file whose tail ends
any start-up error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.vllm_launch import VllmLaunchError, VllmProcess, build_argv, free_port


class EngineError(VllmLaunchError):
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
        self.host, self.port = "127.0.0.1", free_port()
        self._process = VllmProcess(build_argv(self.model, host=self.host, port=self.port, extra_args=self.args),
                                    base_url=self.base_url, env=self.env, log_path=self.log_path,
                                    startup_timeout_s=startup_timeout_s, stop_timeout_s=stop_timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> VllmEngine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._process.start()
        except VllmLaunchError as e:
            raise EngineError(str(e)) from None

    def stop(self) -> None:
        self._process.stop()

    def log_tail(self, lines: int = 40) -> str:
        return self._process.log_tail(lines)
