"""Real prompts from a PyPI package, for tests and the demo: no hub, no network beyond PyPI.

The `chitchat-dataset` package (BYU PCC lab's Chit-Chat Challenge, MIT) ships 7,168 open-domain
two-person chats in one JSON file. `write_chitchat_prompts` turns the first N into OpenAI
messages JSONL: the first speaker is the user, the other the assistant, each speaker's
consecutive lines joined into one turn. The assistant turns are the human partner's
replies; a factory job replaces them with the target's own (or keeps them with
`sampling.keep_original_answers`).
"""

from __future__ import annotations

import importlib.util
import json
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"messages": m}) + "\n" for m in chitchat_chats(n, max_user_turns=max_user_turns))
    atomic_write_bytes(path, lines.encode())
    return path
