"""Conversations -> token ids + loss mask, with the target's own chat template.

The loss mask is 1 exactly on what the target generated: the tokens of each assistant
turn, including the end-of-turn token it emits (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>` ...), and 0 on system and user text, the template's scaffolding (the
`<|im_start|>assistant\\n` header, the newline after `<|im_end|>`) and media placeholders.

Turn boundaries come from rendering twice, never from a regex over the text: for the
assistant turn at index k, render `messages[:k]` with the generation prompt (what the
target was prompted with) and `messages[:k+1]` (the history plus the turn). The first
must be a token prefix of the second, the rest of the second is the turn, and the turn
must appear the same way in the render of the whole conversation. A template that breaks
this (one that rewrites earlier turns, say) makes the row a `RenderError` with the reason,
and the pipeline quarantines it: a mask guessed from a disagreeing render would teach the
draft tokens the target never produced.

Media (images, audio) are written by the template as one placeholder token per item; the
item's preprocessor says how many tokens it becomes, and the placeholder is repeated that
many times, as the target's own processor does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError

from factory.rows import machine_trouble
from factory.targets import EncodedMedia, Frontend

if TYPE_CHECKING:
    import torch

log = logging.getLogger("specmill.factory.render")

OVERLONG_POLICIES = ("truncate", "drop")


class RenderError(ValueError):
    """A row that cannot be rendered into a trustworthy loss mask; `reason` says why."""

    def __init__(self, reason: str, *, source_index: int | None = None):
        self.reason = reason
        self.source_index = source_index
        super().__init__(f"row {source_index}: {reason}" if source_index is not None else reason)


class RenderStatus(StrEnum):
    OK = "ok"
    TRUNCATED = "truncated"  # kept, cut to max_length
    DROPPED_TOO_LONG = "dropped_too_long"  # over max_length with overlong="drop"
    DROPPED_NO_LOSS = "dropped_no_loss_tokens"  # truncation left no assistant token
    REJECTED = "rejected"  # RenderError: quarantine the row, see `reason`


@dataclass(kw_only=True, slots=True)
class RenderConfig:
    max_length: int = 4096  # tokens, after media placeholders are expanded
    overlong: str = "truncate"  # or "drop"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"enable_thinking": False}

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        reserved = {"add_generation_prompt", "tokenize", "chat_template", "conversation"}
        reserved &= set(self.chat_template_kwargs)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}: the renderer sets them itself")


@dataclass(kw_only=True, slots=True)
class Conversation:
    """One source row: chat messages whose assistant turns are the target's own answers.

    Content is a string, or a list of parts: {"type": "text", "text": ...},
    {"type": "image", "image": PIL image | path | uint8 array},
    {"type": "audio", "audio": 1-D waveform at the preprocessor's rate}."""

    messages: list[dict[str, Any]]
    source_index: int
    sample_id: str | None = None  # None: conversation_id(messages); the pipeline adds its generation settings
    temperature: float | None = None
    finish_reason: str | None = None  # of the last assistant turn; "length": it has no end-of-turn token

    def __post_init__(self) -> None:
        if self.sample_id is None:
            self.sample_id = conversation_id(self.messages)


@dataclass(kw_only=True, slots=True)
class RenderedRow:
    sample_id: str
    source_index: int
    input_ids: torch.Tensor  # [T] int64, media placeholders expanded
    loss_mask: torch.Tensor  # [T] uint8
    media: list[EncodedMedia] = field(default_factory=list)  # in placeholder order
    modality_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, start, end)
    temperature: float | None = None
    finish_reason: str | None = None
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(kw_only=True, slots=True)
class RenderResult:
    status: RenderStatus
    source_index: int
    row: RenderedRow | None = None  # set for OK and TRUNCATED
    reason: str | None = None  # set for REJECTED


class Renderer:
    """Pipeline stage: `__call__(conversations) -> results`, one per row, never raising for a
    bad row (it comes back REJECTED with its reason); `render` raises `RenderError` instead."""

    def __init__(self, frontend: Frontend, config: RenderConfig):
        self.frontend = frontend
        self.config = config
        self._kinds = {m.kind for m in frontend.spec.media}
        self._placeholder_kind = {tid: kind for kind, tid in frontend.placeholder_ids.items()}

    def __call__(self, batch: Sequence[Conversation]) -> list[RenderResult]:
        results = []
        for conv in batch:
            try:
                results.append(self.render(conv))
            except RenderError as e:
                log.debug("rejected row %s: %s", conv.source_index, e.reason)
                results.append(RenderResult(status=RenderStatus.REJECTED, source_index=conv.source_index,
                                            reason=e.reason))
        return results

    def render(self, conv: Conversation) -> RenderResult:
        try:
            messages, media = self._prepare(conv.messages)
            ids, mask = self._double_render(messages, conv.finish_reason)
            ids, mask, spans = self._expand_media(ids, mask, media)
        except RenderError as e:
            raise RenderError(e.reason, source_index=conv.source_index) from None
        status = RenderStatus.OK
        if len(ids) > self.config.max_length:
            if self.config.overlong == "drop":
                return RenderResult(status=RenderStatus.DROPPED_TOO_LONG, source_index=conv.source_index)
            ids, mask, media, spans = _truncate(ids, mask, media, spans, self.config.max_length)
            status = RenderStatus.TRUNCATED
        if not any(mask):  # cut before the first answer, or an empty answer cut off by max_tokens
            return RenderResult(status=RenderStatus.DROPPED_NO_LOSS, source_index=conv.source_index)
        import torch

        row = RenderedRow(sample_id=conv.sample_id, source_index=conv.source_index,
                          input_ids=torch.tensor(ids, dtype=torch.long),
                          loss_mask=torch.tensor(mask, dtype=torch.uint8),
                          media=media, modality_spans=spans, temperature=conv.temperature,
                          finish_reason=conv.finish_reason, truncated=status is RenderStatus.TRUNCATED)
        return RenderResult(status=status, source_index=conv.source_index, row=row)

    # -- steps

    def _prepare(self, messages: Any) -> tuple[list[dict[str, Any]], list[EncodedMedia]]:
        """Validate, preprocess media in order of appearance, and hand the template light
        copies (a media part keeps its type and key, not its pixels or samples)."""
        if not isinstance(messages, list) or not messages:
            raise RenderError("field messages must be a non-empty list of {role, content} dicts")
        out, media = [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or "content" not in msg:
                raise RenderError(f"field messages[{i}] must be a dict with a string 'role' and a 'content'")
            content = msg["content"]
            if isinstance(content, list):
                content = self._prepare_parts(content, f"messages[{i}].content", media)
            elif not isinstance(content, str):
                raise RenderError(f"field messages[{i}].content must be a string or a list of parts, "
                                  f"got {type(content).__name__}")
            out.append({**msg, "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise RenderError("the conversation has no assistant turn, so nothing to learn from")
        return out, media

    def _prepare_parts(self, parts: list[Any], where: str, media: list[EncodedMedia]) -> str | list[dict[str, Any]]:
        light = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                light.append(part)
            elif kind in self._kinds and kind in part:
                try:
                    media.append(self.frontend.encode(kind, part[kind]))
                except (ValueError, OSError) as e:  # OSError: an image file that is missing or not an image
                    if machine_trouble(e):
                        raise  # out of file descriptors, an I/O error: not this row's fault
                    raise RenderError(f"field {where}[{j}].{kind}: {e}") from None
                light.append({"type": kind, kind: f"<{kind} {len(media) - 1}>"})
            elif kind in ("image", "audio", "video"):
                raise RenderError(f"field {where}[{j}] is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, but "
                                  f"target family {self.frontend.spec.family!r} takes "
                                  f"{', '.join(sorted(self._kinds)) or 'text only'}")
            else:
                raise RenderError(f"field {where}[{j}] must be {{'type': 'text', 'text': str}} or a media part "
                                  f"{{'type': kind, kind: value}}, got {str(part)[:80]!r}")
        if not self._kinds:
            # Text-only templates concatenate `content` as a string; join plain text parts for them.
            return "".join(p["text"] for p in light)
        return light

    def _ids(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        try:
            text = self.frontend.tokenizer.apply_chat_template(
                messages, chat_template=self.frontend.chat_template, tokenize=False,
                add_generation_prompt=generation_prompt, **self.config.chat_template_kwargs)
        except TemplateError as e:
            raise RenderError(f"the chat template refused the conversation: {e}") from None
        # The template writes every special token (BOS included) itself, as vLLM's chat path assumes.
        return self.frontend.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _double_render(self, messages: list[dict[str, Any]], finish_reason: str | None) -> tuple[list[int], list[int]]:
        full = self._ids(messages, generation_prompt=False)
        mask = [0] * len(full)
        last_assistant = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self._ids(messages[:k], generation_prompt=True)
            turn = self._ids(messages[: k + 1], generation_prompt=False)
            if turn[: len(prompt)] != prompt:
                raise RenderError(f"turn messages[{k}]: the history rendered with the generation prompt is not a "
                                  f"prefix of the history plus the turn ({self._first_difference(prompt, turn)})")
            eot = [i for i in range(len(prompt), len(turn)) if turn[i] in self.frontend.end_of_turn_ids]
            if not eot:
                raise RenderError(f"turn messages[{k}]: no end-of-turn token "
                                  f"(ids {sorted(self.frontend.end_of_turn_ids)}) after the assistant header; "
                                  f"set TargetConfig.end_of_turn_ids for this template")
            end = eot[-1] + 1
            if full[:end] != turn[:end]:
                raise RenderError(f"turn messages[{k}] renders differently inside the whole conversation than after "
                                  f"its own history ({self._first_difference(turn[:end], full)}); the template "
                                  f"rewrites earlier turns")
            # A reply cut off by max_tokens never produced the end-of-turn token the template adds.
            if k == last_assistant and finish_reason == "length":
                end -= 1
            mask[len(prompt):end] = [1] * (end - len(prompt))
        return full, mask

    def _expand_media(self, ids: list[int], mask: list[int], media: list[EncodedMedia]
                      ) -> tuple[list[int], list[int], list[tuple[str, int, int]]]:
        if not self._placeholder_kind:
            return ids, mask, []
        queues = {kind: [m for m in media if m.kind == kind] for kind in self._kinds}
        written = {kind: sum(1 for t in ids if self._placeholder_kind.get(t) == kind) for kind in self._kinds}
        for kind in self._kinds:
            if written[kind] != len(queues[kind]):
                raise RenderError(f"the chat template wrote {written[kind]} {kind} placeholder(s) for "
                                  f"{len(queues[kind])} {kind} item(s); it must write one per item")
        out_ids, out_mask, spans, order = [], [], [], []
        for token, m in zip(ids, mask):
            kind = self._placeholder_kind.get(token)
            if kind is None:
                out_ids.append(token)
                out_mask.append(m)
                continue
            item = queues[kind].pop(0)
            spans.append((kind, len(out_ids), len(out_ids) + item.num_tokens))
            order.append(item)
            out_ids.extend([token] * item.num_tokens)
            out_mask.extend([0] * item.num_tokens)
        media[:] = order  # the model fills placeholders in sequence order, whatever the kinds
        return out_ids, out_mask, spans

    def _first_difference(self, a: list[int], b: list[int]) -> str:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        decode = self.frontend.tokenizer.decode
        return f"first difference at token {i}: {decode(a[i:i + 8])!r} vs {decode(b[i:i + 8])!r}"


def _truncate(ids: list[int], mask: list[int], media: list[EncodedMedia], spans: list[tuple[str, int, int]],
              max_length: int):
    """Cut to max_length, never through a media item: its features must all be there or none."""
    cut = max_length
    for _, start, end in spans:
        if start < cut < end:
            cut = start
    keep = [i for i, (_, _, end) in enumerate(spans) if end <= cut]
    return ids[:cut], mask[:cut], [media[i] for i in keep], [spans[i] for i in keep]


def conversation_id(messages: Any, **settings: Any) -> str:
    """A stable id for a conversation (and the generation settings that produced it).

    Media enter by content: the digest of an image's pixels or a waveform's samples."""

    def default(value: Any) -> Any:
        import numpy as np

        if isinstance(value, np.ndarray):
            return {"ndarray": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(),
                    "dtype": str(value.dtype), "shape": list(value.shape)}
        if hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
            return {"image": hashlib.sha256(value.tobytes()).hexdigest(), "size": list(value.size), "mode": value.mode}
        if hasattr(value, "__fspath__"):
            return str(value)
        raise TypeError(f"cannot fingerprint a {type(value).__name__} in a conversation")

    blob = json.dumps({"messages": messages, "settings": settings}, sort_keys=True, default=default)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
