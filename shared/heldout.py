"""Held-out evaluation prompts: rows of a prompts file (OpenAI `messages` JSONL) whose question
no training conversation also asks. A row's question is what an evaluation sends of it: its
turns before the first assistant turn."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def prompt_rows(path: Path) -> list[str]:
    """A prompts file's rows, each as canonical JSON (so equal chats compare equal)."""
    return [json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines() if line.strip()]


def question(row: str) -> str:
    """The turns of `row` (canonical JSON, see prompt_rows) before its first assistant turn."""
    messages = json.loads(row)["messages"]
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return json.dumps(messages[:first_answer], sort_keys=True)


def new_questions(candidates: Iterable[str], seen: set[str], want: int) -> list[str]:
    """Up to `want` of `candidates`, in order, whose question is not in `seen` nor asked by an
    earlier kept row; the kept rows' questions are added to `seen`."""
    kept: list[str] = []
    for row in candidates:
        if len(kept) == want:
            break
        asked = question(row)
        if asked not in seen:
            seen.add(asked)
            kept.append(row)
    return kept
