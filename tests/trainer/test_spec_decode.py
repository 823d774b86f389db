"""specmill's own speculative decoding (`specmill eval --engine torch`) on tiny real models.

The reference for every output is transformers' own `generate(do_sample=False)`; the
reference for the cached draft is the training-time-test computation (loss.py's attention
pattern) run from scratch on the whole sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import DraftConfig
from trainer.export import eagle_config, load_exported
from trainer.model import DraftArch, Eagle3Draft, Segments
from trainer.spec_decode import EagleProposer, NgramProposer, NoProposer, SpecStats, Target, generate
from trainer.target import TargetArch
from trainer.train import train
from trainer_fixtures import AUX_IDS, VOCAB, export_eagle, run_config

REPO = Path(__file__).parents[2]
K = 3
# random prompts the tiny target continues; their lengths differ so positions differ
PROMPTS = [[(37 * i + 11 * j + 5) % VOCAB for j in range(4 + i)] for i in range(5)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a tiny model is thousands of ~1 ms forwards: a second thread only adds spin and
    sync (10x slower on this shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_model(tiny_target):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # LlamaConfig's default EOS 2 would stop the reference
    return model


@pytest.fixture(scope="module")
def trained_draft(tmp_path_factory, real_data, tiny_target, target_model) -> Eagle3Draft:
    """A draft trained on the tiny target's own samples, exported and loaded back as eval does."""
    root = tmp_path_factory.mktemp("spec")
    train(run_config(root / "run", real_data, tiny_target, steps=80, log_every=80,
                     **{"checkpoint.every": 0, "data.token_budget": 1024, "draft.draft_vocab_size": 384,
                        "optim.lr": 3e-3, "optim.warmup_fraction": 0.1}))
    draft = load_exported(export_eagle(root / "run", root / "draft", dtype="float32"))
    draft.attach_target_embedding(target_model.get_input_embeddings().weight)
    return draft.eval()


def random_draft(target_dir: Path, embed: torch.Tensor, *, draft_vocab: int, seed: int = 0,
                 norms: bool = False) -> Eagle3Draft:
    """norms: with both EAGLE 3.1 norms (draft.norm_before_fc, draft.norm_output), their weights
    not all ones so that a norm applied in the wrong place shows."""
    config = DraftConfig(norm_before_fc=norms, norm_output=norms)
    arch = DraftArch.resolve(TargetArch.from_config_json(target_dir), config, draft_vocab_size=draft_vocab)
    torch.manual_seed(seed)
    draft = Eagle3Draft(arch)
    if norms:
        with torch.no_grad():
            draft.input_norm.weight.uniform_(0.5, 1.5)
            draft.norm.weight.uniform_(0.5, 1.5)
    draft.t2d[:draft_vocab] = True  # the first draft_vocab target ids, d2t offsets 0
    draft.attach_target_embedding(embed)
    return draft.eval()


@pytest.fixture(scope="module", params=["trained", "random", "random-eagle3.1-norms"])
def draft(request, tiny_target, target_model) -> Eagle3Draft:
    if request.param == "trained":
        return request.getfixturevalue("trained_draft")
    return random_draft(tiny_target, target_model.get_input_embeddings().weight, draft_vocab=384,
                        norms=request.param.endswith("norms"))


def greedy_reference(model, prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, min_new_tokens=0)
    completion = out[0, len(prompt):].tolist()
    return completion[:completion.index(eos) + 1] if eos in completion else completion


def test_speculative_output_equals_plain_greedy_token_for_token(target_model, draft):
    target, stats = Target(target_model, AUX_IDS), SpecStats(k=K)
    for prompt in PROMPTS:
        for max_tokens in (1, 2, 9, 40):
            assert generate(target, EagleProposer(draft, K), prompt, max_tokens=max_tokens, eos_ids=set(),
                            stats=stats) == greedy_reference(target_model, prompt, max_tokens), (prompt, max_tokens)
    assert stats.drafts > 0 and stats.draft_tokens == K * stats.drafts


def test_a_trained_draft_gets_accepted_and_still_gives_the_greedy_output(target_model, trained_draft):
    """Without acceptance the test above would only exercise the rejection path."""
    target, stats = Target(target_model, AUX_IDS), SpecStats(k=K)
    for prompt in PROMPTS:
        generate(target, EagleProposer(trained_draft, K), prompt, max_tokens=40, eos_ids=set(), stats=stats)
    # whole chains accepted too, so rollback after a full accept is exercised
    assert stats.accepted_per_pos[0] >= stats.accepted_per_pos[1] >= stats.accepted_per_pos[2] > 0, stats


def test_output_stops_at_an_eos_the_draft_proposed_inside_its_chain(target_model, trained_draft):
    target, stopped_mid_chain = Target(target_model, AUX_IDS), 0
    for prompt in PROMPTS:
        full = greedy_reference(target_model, prompt, 40)
        for cut in (3, 11, 25):
            eos = full[cut]
            expected = greedy_reference(target_model, prompt, 40, eos=eos)
            stats = SpecStats(k=K)
            out = generate(target, EagleProposer(trained_draft, K), prompt, max_tokens=40, eos_ids={eos}, stats=stats)
            assert out == expected, (prompt, cut)
            # tokens the target accepted past the EOS are cut from the output but, as in vLLM, counted
            stopped_mid_chain += stats.forwards + stats.accepted > len(out)
    assert stopped_mid_chain > 0


class Oracle:
    """Proposes the known greedy continuation: `hits[r % len(hits)]` right tokens, then wrong ones."""
    needs_aux = False

    def __init__(self, prompt_len: int, greedy: list[int], hits: list[int]):
        self.prompt_len, self.greedy, self.hits, self.round = prompt_len, greedy, hits, 0

    def reset(self) -> None:
        self.round = 0

    def propose(self, tokens: list[int], aux: torch.Tensor | None, start: int) -> list[int]:
        done, hit = len(tokens) - self.prompt_len, self.hits[self.round % len(self.hits)]
        self.round += 1
        right = self.greedy[done:done + hit]
        return right + [(g + 1) % VOCAB for g in self.greedy[done + hit:done + K]]


@pytest.mark.parametrize("hits", [[0], [K], [2, 0, 3, 1], [1, 3]])
def test_acceptance_counts_and_rollback_follow_a_proposer_whose_hits_are_known(target_model, hits):
    prompt, max_tokens = PROMPTS[2], 30
    greedy = greedy_reference(target_model, prompt, max_tokens + K + 1)
    stats = SpecStats(k=K)
    out = generate(Target(target_model, AUX_IDS), Oracle(len(prompt), greedy, hits), prompt,
                   max_tokens=max_tokens, eos_ids=set(), stats=stats)
    assert out == greedy[:max_tokens]
    done, rounds, per_pos = 1, 0, [0] * K  # the prefill gives the first token
    while done < max_tokens:
        hit = hits[rounds % len(hits)]
        per_pos = [n + (i < hit) for i, n in enumerate(per_pos)]
        done, rounds = done + hit + 1, rounds + 1
    assert (stats.drafts, stats.draft_tokens, stats.forwards) == (rounds, K * rounds, rounds + 1)
    assert stats.accepted == sum(hits[r % len(hits)] for r in range(rounds))
    assert stats.accepted_per_pos == per_pos


def draft_proposals_from_scratch(model, draft: Eagle3Draft, tokens: list[int]) -> list[int]:
    """The draft's k proposals after `tokens`, computed as training computes them (loss.py's TTT
    unroll over the whole sequence, no cache) on target features from one uncached forward."""
    with torch.no_grad():
        states = model(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        aux = torch.stack([states[i] for i in AUX_IDS], 2)  # [1, n-1, 3, H]: positions 0..n-2
        ids = torch.tensor([tokens[1:]])  # step 0's token at t: x_{t+1}
        positions = torch.arange(ids.shape[1])[None]
        segments = Segments.of(torch.zeros_like(ids))
        hidden, cache, proposals = draft.fuse(aux), [], []
        for s in range(K):
            out = draft.layer(draft.embed(ids), hidden, positions + s, cache, segments)
            hidden = draft.recurrent(out)
            best = int(draft.logits(out[0, -1]).argmax())
            proposals.append(best + int(draft.d2t[best]))
            ids = ids.clone()
            ids[0, -1] = proposals[-1]  # step s+1 reads the draft's own token at the chain's head
    return proposals


class RecordingEagle(EagleProposer):
    def __init__(self, draft: Eagle3Draft, k: int):
        super().__init__(draft, k)
        self.calls: list[tuple[list[int], list[int]]] = []

    def propose(self, tokens: list[int], aux: torch.Tensor | None, start: int) -> list[int]:
        proposals = super().propose(tokens, aux, start)
        self.calls.append((list(tokens), proposals))
        return proposals


def test_the_cached_draft_proposes_what_the_draft_recomputed_from_scratch_proposes(target_model, draft):
    proposer = RecordingEagle(draft, K)
    for prompt in PROMPTS[:3]:
        generate(Target(target_model, AUX_IDS), proposer, prompt, max_tokens=30, eos_ids=set(),
                 stats=SpecStats(k=K))
    assert len(proposer.calls) > 20
    for tokens, proposals in proposer.calls:
        assert proposals == draft_proposals_from_scratch(target_model, draft, tokens), tokens


def test_no_proposer_is_plain_greedy_decoding_one_forward_per_token(target_model):
    stats = SpecStats(k=K)
    out = generate(Target(target_model, AUX_IDS), NoProposer(), PROMPTS[0], max_tokens=12, eos_ids=set(),
                   stats=stats)
    assert out == greedy_reference(target_model, PROMPTS[0], 12)
    assert (stats.forwards, stats.drafts, stats.accepted) == (12, 0, 0)


def test_ngram_proposals_match_vllms_prompt_lookup():
    """The torch engine's n-gram way must draft what vLLM's does, or their figures differ."""
    pytest.importorskip("vllm")
    import numpy as np
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as vllm_lookup

    rng = np.random.default_rng(0)
    for trial in range(300):
        tokens = rng.integers(0, 1 + trial % 6, size=int(rng.integers(1, 40))).tolist()
        min_n, max_n = [(1, 4), (4, 4), (2, 3)][trial % 3]
        ours = NgramProposer(k=K, min_n=min_n, max_n=max_n).propose(tokens, None, 0)
        theirs = vllm_lookup(np.array(tokens, dtype=np.int32), min_n, max_n, 10_000, K).tolist()
        assert ours == theirs, (tokens, min_n, max_n)


def test_ngram_way_gives_the_greedy_output_and_counts_only_rounds_that_drafted(target_model):
    stats = SpecStats(k=K)
    # this prompt's greedy continuation repeats itself now and then, so lookup finds matches
    out = generate(Target(target_model, AUX_IDS), NgramProposer(k=K, min_n=1, max_n=3), PROMPTS[1], max_tokens=40,
                   eos_ids=set(), stats=stats)
    assert out == greedy_reference(target_model, PROMPTS[1], 40)
    assert stats.accepted > 0
    assert 0 < stats.drafts < stats.forwards - 1  # some rounds found no match and drafted nothing
    assert stats.drafts <= stats.draft_tokens <= K * stats.drafts  # a match near the end drafts fewer than k


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_audio"])
def test_vlm_and_audio_targets_decode_text_prompts_speculatively_as_greedy(tmp_path, family):
    """Targets the CPU vLLM build cannot serve as EAGLE-3 targets: text-only prompts (token ids)."""
    from factory.default_model import DefaultModelConfig, prepare_default
    from tiny_models import build_tiny_qwen2_audio, build_tiny_qwen2_vl
    from trainer.spec_decode import load_target_model

    build = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_audio": build_tiny_qwen2_audio}[family]
    target_dir = build(tmp_path / family, tokenizer_dir=prepare_default(DefaultModelConfig(engine_check=False)))
    model = load_target_model(target_dir, torch.float32)
    model.generation_config.eos_token_id = None
    draft = random_draft(target_dir, model.get_input_embeddings().weight, draft_vocab=512)
    for proposer in (EagleProposer(draft, K), NgramProposer(k=K, min_n=1, max_n=2)):
        stats = SpecStats(k=K)
        out = generate(Target(model, (2, 4, 5)), proposer, PROMPTS[3], max_tokens=16, eos_ids=set(), stats=stats)
        assert out == greedy_reference(model, PROMPTS[3], 16), type(proposer).__name__
        assert stats.drafts > 0


# --- `specmill eval --engine torch` end to end on a tiny chat model ------------------------------


def write_random_export(target_dir: Path, out: Path, *, aux_ids: list[int], draft_vocab: int) -> Path:
    """A random draft in the exported EAGLE-3 layout (what `specmill export --format eagle` writes)."""
    from safetensors.torch import save_file

    arch = DraftArch.resolve(TargetArch.from_config_json(target_dir), DraftConfig(), draft_vocab_size=draft_vocab)
    torch.manual_seed(1)
    draft = Eagle3Draft(arch)
    draft.t2d[:draft_vocab] = True
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(out / "model.safetensors"))
    meta = {"aux_layer_ids": aux_ids, "aux_layer_convention": "residual_entering_layer", "step": 0,
            "target_name": target_dir.name, "dataset_fingerprint": "random", "config": {"ttt": {"steps": K}}}
    (out / "config.json").write_text(json.dumps(eagle_config(arch, meta, "float32")))
    return out


def test_eval_with_the_torch_engine_reports_every_way_on_a_tiny_chat_model(tmp_path):
    from factory.default_model import DefaultModelConfig, prepare_default
    from tiny_models import build_tiny_causal_lm

    target = build_tiny_causal_lm("qwen2", tmp_path / "qwen2",
                                  tokenizer_dir=prepare_default(DefaultModelConfig(engine_check=False)))
    draft = write_random_export(target, tmp_path / "draft", aux_ids=[2, 4, 5], draft_vocab=512)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in ("Say hello.", "Count to five.", "Name a colour.")))
    done = subprocess.run([sys.executable, "-m", "shared.cli", "eval", "--engine", "torch", "--target", str(target),
                           "--draft", str(draft), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                           "--max-tokens", "20", "--k", str(K)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_thread
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (report["engine"], report["dtype"], report["batching"]) == ("torch", "float32", "sequential (batch 1)")
    ways = report["ways"]
    assert set(ways) == {"none", "ngram", "eagle3"}
    assert ways["none"]["acceptance_length"] is None
    assert ways["none"]["target_forwards"] == ways["none"]["completion_tokens"]  # one forward per token
    assert ways["eagle3"]["drafts"] > 0 and len(ways["eagle3"]["acceptance_per_position"]) == K
    for way in ("ngram", "eagle3"):
        assert ways[way]["greedy_agreement"] == 1.0, ways[way]["differing_prompts"]
        assert ways[way]["texts"] == ways["none"]["texts"]
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0
