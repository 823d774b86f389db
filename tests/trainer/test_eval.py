"""`specmill eval`: the default target served three ways by a real vLLM server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.hardware import local_device, resolve_model_dtype
from trainer.evaluate import EvalConfig, WayRun, load_prompts, parse_spec_metrics, run_way, summarize
from trainer_fixtures import QUESTIONS

REPO = Path(__file__).parents[2]
EVAL_PROMPTS = ["List the months of the year.", "Explain what a computer is.",
                "Repeat the word apple five times.", "What is two plus two?"]


def specmill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_metrics_page_counters_are_summed_and_read_per_position():
    page = "\n".join([
        '# TYPE vllm:spec_decode_num_drafts_total counter',
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="target"} 10.0',
        'vllm:spec_decode_num_drafts_created{engine="0",model_name="target"} 1.7e9',
        'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="target"} 30.0',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="target"} 12.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="0"} 7.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="2"} 1.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="1"} 4.0',
    ])
    m = parse_spec_metrics(page)
    assert (m["drafts"], m["draft_tokens"], m["accepted_tokens"]) == (10.0, 30.0, 12.0)
    assert m["per_pos"] == {0: 7.0, 1: 4.0, 2: 1.0}
    assert parse_spec_metrics("")["drafts"] == 0.0


def test_summary_computes_al_tokens_per_forward_and_agreement():
    ref = WayRun(way="none", texts=["a", "b"], completion_tokens=[10, 10], seconds=2.0)
    run = WayRun(way="eagle3", texts=["a", "c"], completion_tokens=[10, 10], seconds=1.0, drafts=8,
                 draft_tokens=24, accepted=10, accepted_per_pos={0: 6, 1: 3, 2: 1})
    s = summarize(run, ref)
    assert s["acceptance_length"] == pytest.approx(1 + 10 / 8)
    assert s["tokens_per_forward"] == pytest.approx(20 / 10)
    assert s["acceptance_per_position"] == pytest.approx([6 / 8, 3 / 8, 1 / 8])
    assert s["greedy_agreement"] == 0.5 and s["differing_prompts"] == [1]
    none = summarize(ref, None)
    assert none["acceptance_length"] is None and none["tokens_per_forward"] == 1.0


def test_prompts_keep_the_turns_before_the_first_answer_and_bad_rows_are_named(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"},
                                             {"role": "user", "content": "q2"}]}) + "\n")
    assert load_prompts(good) == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n" + '{"msgs": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        load_prompts(bad)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"prompt_token_ids": [5, 9, 2]}\n{"prompt_token_ids": [5, -1]}\n')
    with pytest.raises(ValueError, match=r"ids.jsonl:2: prompt_token_ids must be a non-empty list of token ids"):
        load_prompts(ids)
    ids.write_text('{"prompt_token_ids": [5, 9, 2]}\n')
    assert load_prompts(ids) == [[5, 9, 2]]  # sent as they are


def test_an_unknown_engine_is_refused_naming_the_engines_there_are(tmp_path):
    with pytest.raises(ValueError, match=r"--engine must be one of \('vllm', 'torch'\).*got 'sglang'"):
        EvalConfig(target=tmp_path, draft=tmp_path, prompts=tmp_path / "p", out=tmp_path, engine="sglang")


def test_each_engine_has_its_own_default_dtype_and_an_explicit_one_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "p.jsonl").write_text("")
    make = lambda **kw: EvalConfig(target=tmp_path, draft=tmp_path, prompts=tmp_path / "p.jsonl",  # noqa: E731
                                   out=tmp_path, **kw)
    # vllm: bfloat16 where this machine does it natively, else float32 (shared.hardware)
    assert make(engine="vllm").dtype == resolve_model_dtype("auto", local_device())
    assert make(engine="torch").dtype == "float32"
    assert make(engine="torch", dtype="bfloat16").dtype == "bfloat16"


@pytest.mark.slow
def test_eval_serves_three_ways_and_reports_acceptance_and_speedup(default_draft, tmp_path):
    target, draft = default_draft.target, default_draft.draft
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in EVAL_PROMPTS))
    done = specmill("eval", "--target", str(target), "--draft", str(draft), "--prompts", str(prompts),
                    "--out", str(tmp_path / "out"), "--max-tokens", "24", "--k", "3")
    assert done.returncode == 0, done.stderr[-5000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    ways = report["ways"]
    assert set(ways) == {"none", "ngram", "eagle3"}
    assert ways["none"]["drafts"] == 0 and ways["none"]["acceptance_length"] is None
    for way in ("ngram", "eagle3"):
        r = ways[way]
        assert r["drafts"] > 0 and r["acceptance_length"] >= 1.0, (way, r)
        assert len(r["acceptance_per_position"]) <= 3
        assert 0.0 <= r["greedy_agreement"] <= 1.0
    for r in ways.values():
        assert r["completion_tokens"] > 0
        assert r["speedup"] == pytest.approx(r["output_tokens_per_s"] / ways["none"]["output_tokens_per_s"])
    assert report["simulated_acceptance_length"]["available"] in (True, False)
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0
    print(done.stdout)


CROSS_CHECK_PROMPTS = EVAL_PROMPTS + QUESTIONS  # held-out and training questions: a spread of acceptance


@pytest.mark.slow
@pytest.mark.parametrize("trained", [
    "default_draft",
    # A second trained draft and three more vLLM loads: 13 min on 2 CPUs, which the CI run (the
    # whole suite in 90 minutes) cannot spare. Its figures are in docs/design.md.
    pytest.param("normed_default_draft", marks=pytest.mark.skipif(
        not os.environ.get("SPECMILL_LONG_TESTS"), reason="13 min on 2 CPUs; set SPECMILL_LONG_TESTS=1 to run"))],
    ids=["eagle3", "eagle3.1-norms"])
def test_torch_engine_accepts_as_often_as_vllm_and_gives_the_greedy_output(trained, request, tmp_path):
    """The same draft, prompts and greedy float32 decoding in vLLM's EAGLE-3 proposer and in
    specmill's own loop: their acceptance lengths agree within 5%. A disagreement means one of
    them feeds the draft differently (position ids, aux layers, which hidden state comes last,
    and with the EAGLE 3.1 norms whether vLLM reads them from the export as trained)."""
    from trainer.evaluate import run_ways

    drafted = request.getfixturevalue(trained)
    target, draft = drafted.target, drafted.draft
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                    for q in CROSS_CHECK_PROMPTS))
    prompts = load_prompts(prompts_path)
    common = dict(target=target, draft=draft, prompts=prompts_path, max_tokens=48, k=3, dtype="float32")
    served = run_way("eagle3", EvalConfig(out=tmp_path / "vllm", engine="vllm", concurrency=1, **common), prompts)
    ours = run_ways(EvalConfig(out=tmp_path / "torch", engine="torch", progress=False, **common), prompts,
                    ("none", "eagle3"))
    vllm_al = 1 + served.accepted / served.drafts
    torch_al = 1 + ours["eagle3"].accepted / ours["eagle3"].drafts
    same_text = sum(a == b for a, b in zip(served.texts, ours["eagle3"].texts, strict=True))
    print(f"acceptance length: vLLM {vllm_al:.3f} ({served.drafts:.0f} drafts), torch {torch_al:.3f} "
          f"({ours['eagle3'].drafts} drafts); per position vLLM {served.accepted_per_pos}, "
          f"torch {ours['eagle3'].accepted_per_pos}; same text in {same_text}/{len(prompts)} prompts")
    assert ours["eagle3"].texts == ours["none"].texts  # speculative = plain greedy, token for token
    assert ours["eagle3"].completion_tokens == ours["none"].completion_tokens
    assert abs(torch_al - vllm_al) <= 0.05 * vllm_al, (vllm_al, torch_al)
