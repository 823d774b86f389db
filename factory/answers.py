"""Chats whose answers are the target's own token ids: prompt side from the chat template,
answer side exactly as generated.

`factory.render.Renderer` tokenizes answer *text*, which is right for a data set's
original answers. A resampled answer is already token ids, and decoding them to text and
tokenizing again can give other ids than the model produced (BPE has many spellings of
one string). So a resampled chat is built as

    input_ids = prompt_1 + answer_1 + gap_2 + answer_2 + ... + answer_n + tail
    loss_mask =    0     +    1     +   0   +    1     + ... +    1     +  0

where prompt_1 is the template's render of the turns before the first answer (with the
generation prompt), each gap is the text the template puts between the end of one answer
and the start of the next (end-of-turn, user turn, assistant header), and the tail is
what it writes after the last answer. Later turns are sent to the server as these very
ids, so the model is conditioned on exactly what is stored.

The gaps come from text renders of the history with the answers decoded, and the same
check as the double render applies on the prompt side: each render must extend the
previous one (plus the answer's text) unchanged. A template that rewrites earlier turns
(strips reasoning, trims whitespace) makes the row a `RenderError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError

from factory.render import RenderConfig, RenderError
from factory.targets import Frontend


@dataclass(kw_only=True, slots=True)
class TokenChat:
    """A chat being built turn by turn (see the module docstring)."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # the history, answers as decoded text
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    text: str = ""  # the template's text for input_ids so far
    finish_reasons: list[str] = field(default_factory=list)
    answer_ended_with: int | None = None  # the end-of-turn id the last answer emitted, if any

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)


class AnswerRenderer:
    def __init__(self, frontend: Frontend, config: RenderConfig):
        self.frontend = frontend
        self.config = config

    def prompt(self, chat: TokenChat, turns: list[dict[str, Any]]) -> list[int]:
        """Append the next non-assistant turns and the generation prompt; return the whole
        prompt (the ids to send). Raises RenderError if the template rewrote the history."""
        messages = chat.messages + turns
        text = self._text(messages, generation_prompt=True)
        chat.input_ids += self._gap(chat, text, "the next turn")
        chat.loss_mask += [0] * (len(chat.input_ids) - len(chat.loss_mask))
        chat.messages, chat.text = messages, text
        return list(chat.input_ids)

    def answer(self, chat: TokenChat, token_ids: list[int], finish_reason: str) -> None:
        """Append a generated answer, end-of-turn token included when the model emitted it."""
        tok = self.frontend.tokenizer
        ends = bool(token_ids) and token_ids[-1] in self.frontend.end_of_turn_ids
        body = token_ids[:-1] if ends else token_ids
        text = tok.decode(body, skip_special_tokens=False)
        chat.input_ids += token_ids
        chat.loss_mask += [1] * len(token_ids)
        chat.messages = chat.messages + [{"role": "assistant", "content": text}]
        chat.text += text
        chat.finish_reasons.append(finish_reason)
        chat.answer_ended_with = token_ids[-1] if ends else None

    def finish(self, chat: TokenChat) -> None:
        """Append what the template writes after the last answer (masked out)."""
        text = self._text(chat.messages, generation_prompt=False)
        chat.input_ids += self._gap(chat, text, "the end of the chat")
        chat.loss_mask += [0] * (len(chat.input_ids) - len(chat.loss_mask))
        chat.text = text

    def _gap(self, chat: TokenChat, text: str, what: str) -> list[int]:
        if not text.startswith(chat.text):
            i = next((i for i, (a, b) in enumerate(zip(chat.text, text)) if a != b), min(len(text), len(chat.text)))
            raise RenderError(f"rendering {what} changed the earlier turns (first difference at character {i}: "
                              f"{chat.text[i:i + 30]!r} vs {text[i:i + 30]!r}); the template rewrites history, "
                              f"so answers cannot be kept as token ids")
        ids = self._tokenize(text[len(chat.text):])
        if chat.answer_ended_with is not None:
            # The template closes the answer with the end-of-turn token the model already emitted.
            if not ids or ids[0] != chat.answer_ended_with:
                raise RenderError(f"the answer ended with token {chat.answer_ended_with} but the template closes "
                                  f"the turn with {self.frontend.tokenizer.decode(ids[:3])!r}; set "
                                  f"TargetConfig.end_of_turn_ids to the token the template writes")
            ids = ids[1:]
            chat.answer_ended_with = None
        return ids

    def _text(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        try:
            return self.frontend.tokenizer.apply_chat_template(
                messages, chat_template=self.frontend.chat_template, tokenize=False,
                add_generation_prompt=generation_prompt, **self.config.chat_template_kwargs)
        except TemplateError as e:
            raise RenderError(f"the chat template refused the conversation: {e}") from None

    def _tokenize(self, text: str) -> list[int]:
        # The template writes every special token itself (BOS included), as vLLM's chat path assumes.
        return self.frontend.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
