"""The export served by vLLM as an EAGLE-3 draft of the target it was trained for.

This is the end-to-end check of the alignment convention: a draft trained with the wrong
shift still lowers its own loss, but vLLM then accepts almost none of its tokens. Here
vLLM's measured acceptance per draft position must agree with the trainer's validation
accuracy. Several minutes on 2 cores with vLLM's CPU build (a vLLM engine and a short
training run), so it runs only when asked: SPECMILL_VLLM_TESTS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from trainer.export import export
from trainer.train import train
from trainer_fixtures import run_config, save_tiny_target, write_self_generated

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("SPECMILL_VLLM_TESTS") != "1",
                       reason="starts a vLLM engine (minutes); set SPECMILL_VLLM_TESTS=1 to run"),
]

# vLLM's CPU attention needs a head_dim it has kernels for (16 is not one).
SERVABLE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=256)

_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        target, draft, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(model=target, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, dtype="float32",
                  max_num_seqs=16, disable_log_stats=False,
                  speculative_config={"method": "eagle3", "model": draft, "num_speculative_tokens": 3})
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(max_tokens=48, temperature=0.0, detokenize=False))
        metrics = {m.name: getattr(m, "values", None) or getattr(m, "value", None) for m in llm.get_metrics()}
        print("SPEC " + json.dumps({k: v for k, v in metrics.items() if "spec_decode" in k}))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny servable target, a draft trained on its own samples, and that draft's
    validation record; `serve(format)` exports it in that format and serves it (once)."""
    tmp = tmp_path_factory.mktemp("serving")
    target = save_tiny_target(tmp / "target", **SERVABLE)
    data = write_self_generated(tmp / "data", target, samples=160)
    result = train(run_config(tmp / "run", data, target, steps=150, log_every=50,
                              **{"checkpoint.every": 0, "data.token_budget": 1024, "data.val_samples": 16,
                                 "draft.draft_vocab_size": 384, "optim.lr": 3e-3, "optim.warmup_fraction": 0.1}))
    (val,) = [r for r in result.records if r["split"] == "val"]
    served: dict[str, dict] = {}

    def serve(format: str) -> dict:
        if format not in served:
            draft = export(tmp / "run", tmp / f"draft-{format}", format=format, dtype="float32")
            served[format] = _serve(tmp, target, draft)
        return served[format]

    return val, serve


def _serve(tmp, target, draft) -> dict:
    """vLLM (offline engine, greedy) on 16 prompts with the draft; its spec-decode counters."""
    prompts = [[(37 * i + 11 * j) % 512 for j in range(6)] for i in range(16)]
    script = tmp / "serve.py"
    script.write_text(_VLLM_SCRIPT)
    served = subprocess.run([sys.executable, str(script), str(target), str(draft), json.dumps(prompts)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert served.returncode == 0, served.stderr[-4000:]
    spec = json.loads(next(line for line in served.stdout.splitlines() if line.startswith("SPEC "))[5:])
    drafts = spec["vllm:spec_decode_num_drafts"]
    return {"per_position": [n / drafts for n in spec["vllm:spec_decode_num_accepted_tokens_per_pos"]],
            "al": 1 + spec["vllm:spec_decode_num_accepted_tokens"] / drafts, "drafts": drafts}


def test_vllm_accepts_the_exported_draft_as_often_as_validation_predicts(trained):
    val, serve = trained
    got = serve("eagle")
    # position 0 is accepted iff the draft's top-1 equals the target's: the trainer's acc_0
    assert got["per_position"][0] > 0.1, got  # a misaligned draft scores ~1/384
    assert abs(got["per_position"][0] - val["acc"][0]) < 0.15, (got, val["acc"])
    assert got["al"] > 1.1


def test_vllm_serves_the_speculators_export_exactly_like_the_eagle_export(trained):
    """vLLM detects the speculators layout (Eagle3Speculator config, layers.0.* names) from
    the same speculative_config; same weights, greedy, fp32: the same acceptance. A wrong
    norm_before_residual or a dropped layer prefix would show as a lower one."""
    _, serve = trained
    eagle, spec = serve("eagle"), serve("speculators")
    print(f"eagle {eagle}\nspeculators {spec}")
    assert spec["al"] > 1.1
    assert abs(spec["al"] - eagle["al"]) < 0.02, (spec, eagle)
    assert all(abs(a - b) < 0.02 for a, b in zip(spec["per_position"], eagle["per_position"])), (spec, eagle)
