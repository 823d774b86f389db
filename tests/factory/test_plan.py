"""The disk plan (factory/plan.py, `specmill factory plan`) and the refusal of a job that does not
fit, on a tiny random target with the default model's tokenizer and template: rows, tokens,
bytes per token against a size-limited tmpfs. No Ray, no vLLM: the plan and the refusal come
before either starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.default_model import DefaultModelConfig, prepare_default
from factory.inputs import MediaPaths
from factory.job import load_job
from factory.plan import plan_job
from shared.cli import main

from small_fs import small_filesystem
from tiny_models import TEXT_DIMS, build_tiny_causal_lm

CHATS = [
    [{"role": "user", "content": "Say one."}, {"role": "assistant", "content": "One."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Blue, the colour of the sky."}],
    [{"role": "user", "content": "Only a question, no answer."}],
]
H = TEXT_DIMS["hidden_size"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    tokenizer_dir = prepare_default(DefaultModelConfig(engine_check=False))
    return build_tiny_causal_lm("llama", tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """The three chats, a line that is not JSON and a duplicate of the first chat."""
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    lines = [json.dumps({"messages": c}) for c in CHATS] + ["{broken json", json.dumps({"messages": CHATS[0]})]
    path.write_text("\n".join(lines) + "\n")
    return path


def rendered_tokens(model: Path, messages: list[dict]) -> int:
    """The chat as the template writes it, tokenized whole (the plan renders it turn by turn)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def job_for(model: Path, prompts: Path, out: Path, **keys):
    return load_job(None, {"model": model, "input.paths": [str(prompts)], "output.dir": out, **keys})


def test_a_keep_original_plan_counts_every_rendered_token_and_reads_bytes_per_token_off_the_format(
        tiny, prompts, tmp_path):
    plan = plan_job(job_for(tiny, prompts, tmp_path / "out", **{"sampling.keep_original_answers": True}),
                    media=MediaPaths())
    # The user-only chat has nothing to keep, the broken line and the duplicate are quarantined at read.
    assert (plan.rows, plan.samples, plan.exact) == (5, 2, True)
    assert plan.tokens == sum(rendered_tokens(tiny, c) for c in CHATS[:2])
    # bf16: three aux layers and the last hidden state, 2 bytes a value; an int32 id and a uint8 mask.
    assert dict(plan.size.columns) == {"input_ids": 4, "loss_mask": 1, "aux_hidden_states": 3 * H * 2,
                                       "last_hidden_state": H * 2}
    assert plan.size.per_token == 4 * H * 2 + 5
    assert plan.data_bytes >= plan.tokens * plan.size.per_token
    assert plan.committed_bytes == 0 and plan.volume == tmp_path and plan.fits


def test_a_resampling_plan_counts_every_answer_at_max_tokens_and_cuts_rows_at_max_length(tiny, prompts, tmp_path):
    plan = plan_job(job_for(tiny, prompts, tmp_path / "out", **{"sampling.max_tokens": 100}), media=MediaPaths())
    empty = {"role": "assistant", "content": ""}
    prompt_sides = [[CHATS[0][0], empty], [*CHATS[1][:2], empty, CHATS[1][3], empty], [CHATS[2][0], empty]]
    assert (plan.rows, plan.samples, plan.exact, plan.answers) == (5, 3, False, 4)  # the user-only chat gets one
    assert plan.prompt_tokens == sum(rendered_tokens(tiny, m) for m in prompt_sides)
    assert plan.tokens == plan.prompt_tokens + 4 * 100
    short = plan_job(job_for(tiny, prompts, tmp_path / "out", **{"sampling.max_tokens": 100,
                                                                  "render.max_length": 48}), media=MediaPaths())
    assert short.tokens == 3 * 48


def test_factory_plan_prints_the_numbers_and_exits_1_when_factory_run_would_refuse_the_job(
        tiny, prompts, tmp_path, capsys):
    flags = ["factory", "plan", "--model", str(tiny), "--prompts", str(prompts), "--keep-original-answers",
             "--no-progress"]
    with small_filesystem(tmp_path / "disk", "64k") as disk:
        assert main([*flags, "--out", str(disk / "out")]) == 1
        printed = capsys.readouterr()
        plan = plan_job(job_for(tiny, prompts, disk / "out", **{"sampling.keep_original_answers": True}),
                        media=MediaPaths())
        assert "rows             5 input rows: 2 samples, 3 quarantined at read or render" in printed.out
        assert f"tokens           {plan.tokens:,} (exact" in printed.out
        assert f"bytes per token  {4 * H * 2 + 5:,} = input_ids 4 + loss_mask 1 + aux_hidden_states {6 * H:,} + " \
               f"last_hidden_state {2 * H:,}" in printed.out
        assert f"free space       {64 << 10:,} bytes (64.0 KiB) on the file system of {disk}" in printed.out
        assert "DOES NOT FIT" in printed.out
        assert f"needs {plan.needed_bytes:,} bytes" in printed.err and f"has {64 << 10:,} bytes" in printed.err
        assert main([*flags, "--out", str(disk / "out"), "--ignore-free-space"]) == 0
        assert "`factory run` would start the job anyway" in capsys.readouterr().out
    assert main([*flags, "--out", str(tmp_path / "roomy")]) == 0
    assert "\nfits: " in capsys.readouterr().out


def test_factory_run_refuses_a_job_larger_than_the_free_space_before_anything_starts(tiny, prompts, tmp_path, capsys):
    import ray

    with small_filesystem(tmp_path / "disk", "64k") as disk:
        rc = main(["factory", "run", "--model", str(tiny), "--prompts", str(prompts), "--out", str(disk / "out"),
                   "--keep-original-answers", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1 and "error: the job's data set does not fit in" in err
        assert f"the file system of {disk} has {64 << 10:,} bytes (64.0 KiB) free" in err
        assert "--ignore-free-space" in err
        assert not (disk / "out").exists() and not ray.is_initialized()
