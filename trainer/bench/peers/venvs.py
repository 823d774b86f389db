"""A virtual environment per peer, made once under `$SPECMILL_CACHE/peers/<name>` (default
~/.cache/specmill/peers/<name>), never in the project's own Python.

`python3 -m venv --system-site-packages` reuses the installed CPU torch, transformers and
pyarrow (no multi-GB CUDA torch download). Each peer is installed with `--no-deps` - both pin
what must not replace those (speculators: torchvision/torchaudio built for another torch;
SpecForge: torch 2.11, transformers 5.8, sglang 0.5.14) - and then only the packages its
offline training path imports. A `ready.json` marker is written last, so an interrupted
install is redone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("specmill.bench.peers")


@dataclass(frozen=True, slots=True)
class PeerPackage:
    name: str
    pin: str  # the peer itself, installed with --no-deps
    extra: tuple[str, ...]  # what its offline training imports, resolved normally by pip
    check: str  # a module to import once installed


PACKAGES = {
    "speculators": PeerPackage(
        name="speculators", pin="speculators==0.9.0",
        # hs-connectors holds its hidden-state file reader; datasets reads the HF dir
        extra=("hs-connectors==0.9.0", "datasets>=4.0.0,<=5.1.0", "loguru>=0.7.2,<=0.7.3", "typer>=0.12.0",
               "pydantic-settings>=2.0.0"),
        check="speculators.train.cli"),
    "specforge": PeerPackage(
        name="specforge", pin="specforge==0.2.0",
        extra=("datasets", "accelerate", "pyyaml"),
        check="specforge.cli"),
}


def cache_root() -> Path:
    return Path(os.environ.get("SPECMILL_CACHE", Path.home() / ".cache" / "specmill")).expanduser()


def venv_dir(name: str) -> Path:
    return cache_root() / "peers" / name


def ensure_venv(name: str) -> Path:
    """The peer's venv Python, creating and installing it on first use. Raises
    `subprocess.CalledProcessError` (with pip's output) when an install fails."""
    package = PACKAGES[name]
    root = venv_dir(name)
    python = root / "bin" / "python"
    marker = root / "ready.json"
    if marker.is_file() and json.loads(marker.read_text()).get("pin") == package.pin:
        return python
    log.info("making the %s venv in %s (system site packages: the installed CPU torch)", name, root)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(root)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", package.pin])
    _run([*pip, *package.extra])
    _run([str(python), "-c", f"import {package.check}"])
    marker.write_text(json.dumps({"pin": package.pin, "extra": list(package.extra)}))
    return python


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, cmd, output=result.stdout)
