"""Real Ray nodes on this machine, each a separate `ray start --block` process in a session of
its own, with its own temp dir and ports, so that a test can kill one node (its whole session:
raylet, object store, workers) and clean up only what it started - never another Ray on the
machine (`ray stop` would kill them all)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STARTED = "Ray runtime started."


def cluster_env() -> dict[str, str]:
    """Environment for every node and driver of one test cluster: token authentication (Ray's
    default) with a token of its own, handed to each process, as a real cluster hands it out."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(kw_only=True)
class RayNode:
    """One `ray start --block` process; `kill()` takes the node down as a lost machine would."""

    name: str
    num_cpus: int
    resources: dict[str, float]
    head_address: str | None = None  # None: this is the head
    env: dict[str, str] = field(default_factory=dict)  # e.g. the cluster's auth token (see cluster_env)
    temp_dir: Path = field(init=False)
    address: str = field(init=False, default="")
    proc: subprocess.Popen | None = field(init=False, default=None)

    def start(self, timeout: float = 120) -> "RayNode":
        # Ray's socket paths must stay under ~107 bytes: a short temp dir, not pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"smB-{self.name}-", dir="/tmp"))
        port = free_port()
        cmd = ["ray", "start", "--block", "--disable-usage-stats", "--num-cpus", str(self.num_cpus),
               "--resources", json.dumps(self.resources), "--temp-dir", str(self.temp_dir),
               "--object-store-memory", str(200 << 20), "--min-worker-port", "0", "--max-worker-port", "0"]
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            cmd += [flag, str(free_port())]
        if self.head_address is None:
            cmd += ["--head", "--port", str(port), "--include-dashboard", "false",
                    "--ray-client-server-port", str(free_port())]
        else:
            cmd += ["--address", self.head_address]
        self.log = self.temp_dir / "ray-start.log"
        env = {**os.environ, **self.env}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while STARTED not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"ray start ({self.name}) failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        if self.head_address is None:
            import ray._private.services as services

            self.address = f"{services.get_node_ip_address()}:{port}"
        return self

    def pids(self) -> list[int]:
        """Every live process of this node: its session, plus any whose command line names its temp dir."""
        if self.proc is None:
            return []
        mine = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getsid(p.pid) == self.proc.pid or str(self.temp_dir) in " ".join(p.info["cmdline"] or []):
                    mine.append(p.pid)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        return mine

    def kill(self) -> None:
        """SIGKILL the node's whole session at once, as a machine that loses power; then any straggler."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for _ in range(3):
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if not self.pids():
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # logs, sockets, spilled objects
