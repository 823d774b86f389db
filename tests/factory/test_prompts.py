import json

from factory.prompts import EVALS_FILES, evals_chats, write_prompts


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
