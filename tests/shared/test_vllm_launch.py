"""The shared vLLM launcher, with a stand-in server process (a real vLLM start is in the factory
and trainer slow tests): health wait, start-up failure with the log's tail, and a stop that
reaches the whole process group."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from shared.hardware import local_device, resolve_model_dtype
from shared.vllm_launch import VllmLaunchError, VllmProcess, build_argv, free_port, is_healthy

# Answers /health with 200 after `delay` seconds, and forks a child that would outlive it (as
# vLLM's engine core does) and writes its pid to a file.
_SERVER = r"""
import http.server, os, subprocess, sys, time
port, delay, child_pid_file = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(child_pid_file, "w").write(str(child.pid))
print("stand-in server starting", flush=True)
time.sleep(delay)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_argv_runs_the_module_entry_point_and_refuses_flags_the_launcher_sets():
    argv = build_argv("/m", host="127.0.0.1", port=8000, served_model_name="t", extra_args=("--enforce-eager",))
    assert argv == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--host",
                    "127.0.0.1", "--port", "8000", "--served-model-name", "t", "--enforce-eager",
                    "--dtype", resolve_model_dtype("auto", local_device())]  # this machine's, unless given
    given = build_argv("/m", host="h", port=1, extra_args=("--dtype", "float16"))
    assert given[given.index("--dtype") + 1] == "float16" and given.count("--dtype") == 1
    with pytest.raises(ValueError, match="--port"):
        build_argv("/m", host="h", port=1, extra_args=("--port=9",))


def test_start_waits_for_health_and_stop_ends_the_whole_process_group(tmp_path: Path):
    port, pid_file = free_port(), tmp_path / "child.pid"
    url = f"http://127.0.0.1:{port}"
    process = VllmProcess([sys.executable, "-c", _SERVER, str(port), "1.5", str(pid_file)], base_url=url,
                          log_path=tmp_path / "logs" / "server.log", stop_timeout_s=10)
    process.start()
    try:
        assert is_healthy(url)
        child = int(pid_file.read_text())
        assert os.getpgid(child) == process.pid
    finally:
        process.stop()
    assert not is_healthy(url, timeout_s=1.0)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)
    assert "stand-in server starting" in process.log_tail()


def test_a_server_that_dies_while_starting_raises_with_its_log_tail(tmp_path: Path):
    process = VllmProcess([sys.executable, "-c", "import sys; print('no such model: /m'); sys.exit(3)"],
                          base_url=f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "s.log")
    with pytest.raises(VllmLaunchError, match="(?s)exited with code 3.*no such model"):
        process.start()
    assert not process.running


def test_a_server_never_healthy_is_stopped_after_the_startup_timeout(tmp_path: Path):
    port, pid_file = free_port(), tmp_path / "child.pid"
    process = VllmProcess([sys.executable, "-c", _SERVER, str(port), "60", str(pid_file)],
                          base_url=f"http://127.0.0.1:{port}", log_path=tmp_path / "s.log", startup_timeout_s=2,
                          stop_timeout_s=10)
    with pytest.raises(VllmLaunchError, match="not healthy after 2 s"):
        process.start()
    assert not process.running and not alive(int(pid_file.read_text()))
