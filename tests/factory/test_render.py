"""Chat rendering and the loss mask, on the real default model's tokenizer and ChatML template."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from factory.default_model import DefaultModelConfig, prepare_default
from factory.render import Conversation, RenderConfig, RenderError, Renderer, RenderStatus, conversation_id
from factory.targets import Frontend, TargetConfig


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The default model from the user's cache (prepared there with the transformers check only if
    missing). Not conftest's `default_model_dir`, which prepares a fresh copy and starts vLLM: minutes
    these tests do not need."""
    return prepare_default(DefaultModelConfig(engine_check=False))


@pytest.fixture(scope="module")
def frontend(smollm_dir: Path) -> Frontend:
    return Frontend.load(TargetConfig(model=smollm_dir))


def chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def render(frontend: Frontend, messages, **kwargs):
    conv_kwargs = {k: kwargs.pop(k) for k in ("finish_reason",) if k in kwargs}
    result = Renderer(frontend, RenderConfig(**kwargs)).render(
        Conversation(messages=messages, source_index=7, **conv_kwargs))
    return result


def masked_runs(frontend: Frontend, row) -> list[str]:
    """The decoded text of each maximal run of loss-masked tokens."""
    runs, current = [], []
    for token, m in zip(row.input_ids.tolist(), row.loss_mask.tolist()):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [frontend.tokenizer.decode(r) for r in runs]


def test_loss_mask_is_exactly_the_answer_and_its_end_of_turn_token(frontend):
    result = render(frontend, chat("Hi", "Hello there!"))
    assert result.status is RenderStatus.OK
    row = result.row
    tok = frontend.tokenizer
    assert masked_runs(frontend, row) == ["Hello there!<|im_end|>"]
    ids, mask = row.input_ids.tolist(), row.loss_mask.tolist()
    # The "\n" after <|im_end|> is template scaffolding the model never emits.
    assert tok.decode(ids[-1:]) == "\n" and mask[-1] == 0
    # The assistant header right before the answer is the prompt, not the answer.
    first = mask.index(1)
    assert tok.decode(ids[:first]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert row.input_ids.dtype.is_floating_point is False and row.loss_mask.max() == 1


def test_every_assistant_turn_of_a_multi_turn_chat_is_masked(frontend):
    messages = chat("What is 2+2?", "4.", "And 3+3?", "6, of course.", "Thanks", "You're welcome!",
                    system="Be brief.")
    row = render(frontend, messages).row
    assert masked_runs(frontend, row) == ["4.<|im_end|>", "6, of course.<|im_end|>", "You're welcome!<|im_end|>"]
    assert "Be brief" not in "".join(masked_runs(frontend, row))


def test_each_answer_starts_right_after_the_prompt_the_target_was_given(frontend):
    """The unmasked tokens before each answer are exactly the generation-prompt render of the history."""
    messages = chat("One", "First answer", "Two", "Second answer")
    row = render(frontend, messages).row
    ids, mask = row.input_ids.tolist(), row.loss_mask.tolist()
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    for k, start in zip((1, 3), starts):
        text = frontend.tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        assert ids[:start] == frontend.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_template_that_rewrites_earlier_turns_makes_the_row_rejected_with_a_reason(frontend):
    # Like templates that drop the reasoning of earlier answers: an answer reads differently
    # once a later turn follows it.
    rewriting = frontend.chat_template.replace(
        "message['content']", "('[earlier answer]' if message['role'] == 'assistant' and not loop.last "
                               "else message['content'])")
    quirky = dataclasses.replace(frontend, chat_template=rewriting)
    messages = chat("One", "First answer", "Two", "Second answer")
    with pytest.raises(RenderError, match=r"messages\[1\] renders differently") as err:
        render(quirky, messages)
    assert err.value.source_index == 7 and "rewrites earlier turns" in err.value.reason
    # The stage does not raise: it hands the row back for quarantine, with the reason.
    [result] = Renderer(quirky, RenderConfig())([Conversation(messages=messages, source_index=3)])
    assert result.status is RenderStatus.REJECTED and result.row is None
    assert "messages[1]" in result.reason and result.source_index == 3
    # A single-turn row is unaffected by the quirk.
    assert render(quirky, chat("One", "Only answer")).status is RenderStatus.OK


def test_generation_prompt_that_is_not_a_prefix_of_the_turn_is_rejected(frontend):
    mismatched = frontend.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'")
    assert mismatched != frontend.chat_template
    with pytest.raises(RenderError, match=r"messages\[1\].*not a prefix.*first difference at token"):
        render(dataclasses.replace(frontend, chat_template=mismatched), chat("One", "Answer"))


def test_reply_cut_off_by_max_tokens_does_not_learn_the_end_of_turn_token(frontend):
    messages = chat("Tell me a story", "Once upon a", "Go on", "time there was")
    row = render(frontend, messages, finish_reason="length").row
    # The earlier answer ended normally; the last one never produced <|im_end|> itself.
    assert masked_runs(frontend, row) == ["Once upon a<|im_end|>", "time there was"]
    assert row.finish_reason == "length"


def test_overlong_rows_are_truncated_or_dropped_as_configured_and_counted(frontend):
    messages = chat("Short question", "A long answer " * 40)
    full = render(frontend, messages).row
    assert full.num_tokens > 60
    truncated = render(frontend, messages, max_length=60)
    assert truncated.status is RenderStatus.TRUNCATED and truncated.row.truncated
    assert truncated.row.input_ids.tolist() == full.input_ids[:60].tolist()
    assert truncated.row.loss_mask.tolist() == full.loss_mask[:60].tolist()
    assert render(frontend, messages, max_length=60, overlong="drop").status is RenderStatus.DROPPED_TOO_LONG
    # Cut before the answer starts: nothing left to learn.
    assert render(frontend, messages, max_length=20).status is RenderStatus.DROPPED_NO_LOSS

    renderer = Renderer(frontend, RenderConfig(max_length=60, overlong="drop"))
    batch = [Conversation(messages=messages, source_index=0), Conversation(messages=chat("Hi", "Hey"), source_index=1),
             Conversation(messages=chat("Hi"), source_index=2)]
    counts = Counter(r.status for r in renderer(batch))
    assert counts == {RenderStatus.DROPPED_TOO_LONG: 1, RenderStatus.OK: 1, RenderStatus.REJECTED: 1}


@pytest.mark.parametrize("messages, where", [
    ([], "field messages must be a non-empty list"),
    ([{"role": "user"}], r"field messages\[0\] must be a dict"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], r"field messages\[0\].content must be"),
    (chat("Only a question"), "no assistant turn"),
    ([{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}, {"role": "assistant", "content": "A cat"}],
     r"field messages\[0\].content\[0\] is an image, but target family 'llama' takes text only"),
    ([{"role": "user", "content": [{"type": "table"}]}, {"role": "assistant", "content": "x"}],
     r"field messages\[0\].content\[0\] must be"),
])
def test_malformed_rows_are_rejected_naming_the_field(frontend, messages, where):
    with pytest.raises(RenderError, match=where):
        render(frontend, messages)


def test_text_parts_are_joined_for_a_text_only_template(frontend):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]}]
    joined = render(frontend, chat("Hello", "Hi!")).row
    assert render(frontend, parts).row.input_ids.tolist() == joined.input_ids.tolist()


def test_sample_id_is_stable_and_depends_on_content_and_settings():
    a = conversation_id(chat("Hi", "Hello"))
    assert a == conversation_id(chat("Hi", "Hello"))
    assert a == Conversation(messages=chat("Hi", "Hello"), source_index=0).sample_id
    assert a != conversation_id(chat("Hi", "Hello!"))
    assert a != conversation_id(chat("Hi", "Hello"), temperature=0.7)
    assert Conversation(messages=chat("Hi", "Hello"), source_index=0, sample_id="given").sample_id == "given"


@pytest.mark.parametrize("kwargs, field", [
    ({"max_length": 1}, "max_length"),
    ({"overlong": "cut"}, "overlong"),
    ({"chat_template_kwargs": {"add_generation_prompt": True}}, "chat_template_kwargs"),
])
def test_render_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RenderConfig(**kwargs)
