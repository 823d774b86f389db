"""The training-time-test unroll: what each draft position at each step may see."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import DraftConfig, TTTConfig
from trainer.data import Batch, Position
from trainer.loss import acceptance_length, counted_positions, target_distribution, ttt_loss, ttt_unroll
from trainer.model import DraftArch, Eagle3Draft, Segments
from trainer.target import TargetArch, TargetHead, TargetWeights
from trainer.vocab import build_vocab
from trainer_fixtures import HIDDEN, VOCAB, tiny_llama_config

K = 4


def make_draft(seed: int = 0, *, norm_before_fc: bool = False, norm_output: bool = False) -> Eagle3Draft:
    torch.manual_seed(seed)
    arch = DraftArch(hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=512, vocab_size=VOCAB, draft_vocab_size=VOCAB,
                     norm_before_fc=norm_before_fc, norm_output=norm_output)
    draft = Eagle3Draft(arch)
    with torch.no_grad():  # non-trivial norms so a wrong wiring shows
        for p in draft.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    weights = TargetWeights(embed=torch.randn(VOCAB, HIDDEN), norm=torch.rand(HIDDEN) + 0.5,
                            lm_head=torch.randn(VOCAB, HIDDEN) / 8)
    vocab = build_vocab({i: 1 for i in range(VOCAB)}, target_vocab_size=VOCAB, draft_vocab_size=VOCAB)
    draft.init_from_target(weights, vocab)
    return draft.eval()


def make_batch(lengths: list[int], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return Batch(
        input_ids=torch.randint(0, VOCAB, (1, total), generator=g),
        loss_mask=torch.ones(1, total, dtype=torch.bool),
        doc_ids=torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None],
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        aux_hidden_states=torch.randn(1, total, 3, HIDDEN, generator=g),
        last_hidden_state=torch.randn(1, total, HIDDEN, generator=g),
        samples=len(lengths), after=Position())


def naive_chain(draft: Eagle3Draft, batch: Batch, t: int, steps: int) -> list[torch.Tensor]:
    """What the draft computes at inference when it drafts `steps` tokens after position t,
    written independently of the TTT code: one growing sequence (the step-0 prefix 0..t,
    then one entry per earlier draft), plain causal attention recomputed from scratch, and
    HF's own RoPE. With norm_before_fc the fc input is RMS-normalised over all 3H; with
    norm_output the normed output is what the next step reads (vLLM's EAGLE-3 draft).
    Returns the (pre-norm) hidden output of each step at position t."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / (x.pow(2).mean(-1, keepdim=True) + arch.rms_norm_eps).sqrt()

    layer, arch = draft.midlayer, draft.arch
    rope = LlamaRotaryEmbedding(tiny_llama_config(hidden_size=HIDDEN, num_attention_heads=4, head_dim=16))
    ids, aux = batch.input_ids[0], batch.aux_hidden_states[0]
    embeds = F.embedding(ids[1:t + 2], draft.embed_tokens)  # x_{t'+1} for t' = 0..t
    fc_input = aux[: t + 1].flatten(-2)  # [t+1, 3H]
    hidden = draft.fc(rms(fc_input, draft.input_norm.weight) if arch.norm_before_fc else fc_input)  # g_{t'}
    positions = list(range(t + 1))
    outs = []
    for s in range(steps):
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)[None]
        n = x.shape[1]
        attn = layer.self_attn
        q = attn.q_proj(x).view(1, n, 4, 16).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, 2, 16).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, 2, 16).transpose(1, 2)
        cos, sin = rope(x, torch.tensor([positions]))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
        h = hidden[None] + attn.o_proj(o.transpose(1, 2).reshape(1, n, 64))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        outs.append(h[0, -1])
        # the next draft step after position t: its own output, the next token, one position on
        embeds = torch.cat([embeds, F.embedding(ids[t + 2 + s:t + 3 + s], draft.embed_tokens)])
        hidden = torch.cat([hidden, rms(h[0, -1:], draft.norm.weight) if arch.norm_output else h[0, -1:]])
        positions.append(t + 1 + s)
    assert arch.head_dim == 16
    return outs


@pytest.mark.parametrize("norm_before_fc, norm_output", [(False, False), (True, True), (True, False), (False, True)],
                         ids=["eagle3", "eagle3.1-norms", "norm_before_fc", "norm_output"])
@torch.no_grad()
def test_each_step_matches_inference_recomputed_naively(norm_before_fc, norm_output):
    draft, batch = make_draft(norm_before_fc=norm_before_fc, norm_output=norm_output), make_batch([24])
    outs = ttt_unroll(draft, batch, K)
    for t in (0, 5, 17):
        for s, expected in enumerate(naive_chain(draft, batch, t, K)):
            torch.testing.assert_close(outs[s][0, t], expected, atol=2e-5, rtol=1e-5,
                                       msg=f"step {s} position {t}")


@torch.no_grad()
def test_a_position_never_sees_later_positions():
    draft, batch = make_draft(), make_batch([32])
    before = ttt_unroll(draft, batch, K)
    t = 12
    changed = make_batch([32], seed=1)
    # Position t reads aux[0..t] and tokens x_{1..t+K}; change everything after that.
    changed.aux_hidden_states[:, : t + 1] = batch.aux_hidden_states[:, : t + 1]
    changed.input_ids[:, : t + K + 1] = batch.input_ids[:, : t + K + 1]
    after = ttt_unroll(draft, changed, K)
    for s in range(K):
        torch.testing.assert_close(after[s][0, : t + 1], before[s][0, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(after[s][0, t + 1:], before[s][0, t + 1:])


@torch.no_grad()
def test_packed_samples_do_not_see_each_other():
    draft = make_draft()
    a, b = make_batch([20], seed=2), make_batch([15], seed=3)
    b_doc_ids = b.doc_ids + 1
    packed = Batch(**{name: torch.cat([getattr(a, name), b_doc_ids if name == "doc_ids" else getattr(b, name)], 1)
                      for name in ("input_ids", "loss_mask", "doc_ids", "position_ids", "aux_hidden_states",
                                   "last_hidden_state")}, samples=2, after=Position())
    together, alone_a, alone_b = (ttt_unroll(draft, x, K) for x in (packed, a, b))
    for s in range(K):
        torch.testing.assert_close(together[s][0, :20 - K], alone_a[s][0, :20 - K], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[s][0, 20:], alone_b[s][0], atol=1e-5, rtol=1e-5)


def test_segments_cut_at_sample_boundaries():
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate([7, 30, 5, 12, 9])])[None]
    assert Segments.of(doc_ids, max_tokens=17).spans == ((0, 0, 7), (0, 7, 37), (0, 37, 54), (0, 54, 63))
    assert Segments.of(doc_ids, max_tokens=1000).spans == ((0, 0, 63),)
    two_rows = torch.stack([doc_ids[0, :20], doc_ids[0, 20:40]])
    assert Segments.of(two_rows, max_tokens=8).spans == ((0, 0, 7), (0, 7, 20), (1, 0, 17), (1, 17, 20))
    mask = Segments.of(doc_ids, max_tokens=17).masks[2]  # samples 2 and 3 (5 and 12 tokens)
    assert mask.shape == (1, 1, 17, 17)
    assert mask[0, 0, 6, :6].tolist() == [False] * 5 + [True] and mask[0, 0, 4, :6].tolist() == [True] * 5 + [False]


def test_attending_in_segments_changes_nothing_but_the_work():
    """Segment-wise attention equals whole-row attention, forward and backward."""
    lengths = [7, 30, 5, 12, 9]
    batch = make_batch(lengths, seed=4)
    results = []
    for max_tokens in (10**6, 16, 1):
        draft = make_draft()
        outs = ttt_unroll(draft, batch, K, Segments.of(batch.doc_ids, max_tokens=max_tokens))
        sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in draft.named_parameters()}))
    (whole, whole_grads), *cut = results
    for outs, grads in cut:
        for s in range(K):
            torch.testing.assert_close(outs[s], whole[s], atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_counted_positions_follow_the_shift_and_the_masks():
    draft, batch = make_draft(), make_batch([10, 6])
    batch.loss_mask[0, 4] = False  # token x_4 is not learned: no step predicts it
    head = TargetHead(TargetWeights(embed=draft.embed_tokens, norm=torch.ones(HIDDEN),
                                    lm_head=torch.randn(VOCAB, HIDDEN)), eps=1e-6, pre_norm=True)
    target = target_distribution(head, batch.last_hidden_state, draft)
    for s in range(3):
        counted = counted_positions(batch, target, s)[0]
        # step s at position t predicts x_{t+2+s}: sample 0 spans 0..9, sample 1 spans 10..15
        expected = [t + 2 + s <= 9 and t + 2 + s != 4 for t in range(10)] + [t + 2 + s <= 15 for t in range(10, 16)]
        assert counted.tolist() == expected, f"step {s}"


def test_target_distribution_over_a_pruned_draft_vocab_equals_the_full_head_restricted():
    torch.manual_seed(5)
    n = VOCAB // 3
    arch = DraftArch(hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=512, vocab_size=VOCAB, draft_vocab_size=n)
    draft = Eagle3Draft(arch)
    weights = TargetWeights(embed=torch.randn(VOCAB, HIDDEN), norm=torch.rand(HIDDEN) + 0.5,
                            lm_head=torch.randn(VOCAB, HIDDEN))
    counts = {i: int(c) for i, c in enumerate(torch.randint(1, 100, (VOCAB,)))}
    draft.init_from_target(weights, build_vocab(counts, target_vocab_size=VOCAB, draft_vocab_size=n))
    head = TargetHead(weights, eps=1e-6, pre_norm=True)
    last = torch.randn(2, 40, HIDDEN)
    target = target_distribution(head, last, draft)
    full = head(last)  # [2, 40, V]
    best = full.argmax(-1)
    ids = draft.draft_ids
    assert 0 < int(draft.t2d[best].sum()) < best.numel()  # both cases occur
    assert torch.equal(target.in_vocab, draft.t2d[best])
    assert torch.equal(ids[target.top1][target.in_vocab], best[target.in_vocab])
    torch.testing.assert_close(target.probs, torch.softmax(full[..., ids], -1))


def test_loss_is_weighted_soft_cross_entropy_against_the_shifted_target():
    draft, batch = make_draft(), make_batch([12])
    head = TargetHead(TargetWeights(embed=draft.embed_tokens, norm=torch.ones(HIDDEN),
                                    lm_head=torch.randn(VOCAB, HIDDEN)), eps=1e-6, pre_norm=True)
    out = ttt_loss(draft, head, batch, TTTConfig(steps=2, step_decay=0.5))
    hs = ttt_unroll(draft, batch, 2)
    p = torch.softmax(head(batch.last_hidden_state[0]), -1)  # full draft vocab = target vocab here
    expected = 0.0
    for s in range(2):
        terms = [-(p[t + 1 + s] * torch.log_softmax(draft.logits(hs[s][0, t]), -1)).sum() for t in range(12 - 2 - s)]
        expected += 0.5**s * torch.stack(terms).mean()
        assert int(out.counted[s]) == len(terms)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_acceptance_length_is_one_plus_sum_of_running_products():
    assert acceptance_length([]) == 1.0
    assert math.isclose(acceptance_length([0.8, 0.5, 0.5]), 1 + 0.8 + 0.4 + 0.2)


def test_draft_sizes_come_from_the_target_unless_configured():
    target = TargetArch(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=None,
                        max_position_embeddings=4096, vocab_size=VOCAB, num_hidden_layers=4,
                        tie_word_embeddings=False, hidden_act="silu")
    arch = DraftArch.resolve(target, DraftConfig(), draft_vocab_size=100)
    assert (arch.intermediate_size, arch.num_attention_heads, arch.num_key_value_heads, arch.rope_theta) == \
        (128, 4, 2, 5e5)
    arch = DraftArch.resolve(target, DraftConfig(intermediate_size=256, num_attention_heads=8), draft_vocab_size=100)
    assert (arch.intermediate_size, arch.num_attention_heads, arch.num_key_value_heads) == (256, 8, 8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        DraftArch.resolve(target, DraftConfig(num_attention_heads=6, num_key_value_heads=4), draft_vocab_size=1)


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_match_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from trainer.model import rope_inv_freq

    params = {"rope_type": "default", **(scaling or {}), "rope_theta": 500000.0}
    config = tiny_llama_config(head_dim=16, max_position_embeddings=131072, rope_parameters=params)
    if scaling is None:
        expected = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert torch.equal(rope_inv_freq(16, 500000.0, scaling), expected)


def test_target_distribution_where_needed_equals_the_whole_one_there():
    draft, batch = make_draft(), make_batch([10, 6], seed=7)
    head = TargetHead(TargetWeights(embed=draft.embed_tokens, norm=torch.rand(HIDDEN) + 0.5,
                                    lm_head=torch.randn(VOCAB, HIDDEN)), eps=1e-6, pre_norm=True)
    needed = torch.rand(batch.loss_mask.shape) < 0.4
    whole = target_distribution(head, batch.last_hidden_state, draft)
    part = target_distribution(head, batch.last_hidden_state, draft, needed=needed)
    torch.testing.assert_close(part.probs[needed], whole.probs[needed])
    assert torch.equal(part.top1[needed], whole.top1[needed])
    assert torch.equal(part.in_vocab[needed], whole.in_vocab[needed])
    assert not part.in_vocab[~needed].any() and not part.probs[~needed].any()


@pytest.mark.parametrize("norms", [False, True], ids=["eagle3", "eagle3.1-norms"])
def test_later_steps_run_only_where_asked_and_agree_there(norms):
    draft, batch = make_draft(norm_before_fc=norms, norm_output=norms), make_batch([20, 13], seed=8)
    active = torch.rand(batch.loss_mask.shape, generator=torch.Generator().manual_seed(9)) < 0.4
    weights = [torch.randn(HIDDEN) for _ in range(K)]

    def run(only):
        draft.zero_grad()
        outs = ttt_unroll(draft, batch, K, Segments.of(batch.doc_ids, max_tokens=16), active=only)
        # a loss that reads step 0 everywhere and later steps only where active
        loss = (outs[0] @ weights[0]).sum() + sum((o[active] @ w).sum() for o, w in zip(outs[1:], weights[1:]))
        loss.backward()
        return outs, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}

    whole, whole_grads = run(None)
    part, part_grads = run(active)
    torch.testing.assert_close(part[0], whole[0])
    for s in range(1, K):
        torch.testing.assert_close(part[s][active], whole[s][active], atol=1e-5, rtol=1e-5)
        assert not part[s][~active].any()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(part_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_the_loss_is_the_same_whichever_positions_the_later_steps_skip():
    draft, batch = make_draft(), make_batch([18, 11], seed=10)
    batch.loss_mask[0, :7] = False  # a prompt: nothing before x_7 is learned
    batch.loss_mask[0, 18:22] = False
    head = TargetHead(TargetWeights(embed=draft.embed_tokens, norm=torch.ones(HIDDEN),
                                    lm_head=torch.randn(VOCAB, HIDDEN)), eps=1e-6, pre_norm=True)
    config = TTTConfig(steps=3, step_decay=0.8)
    out = ttt_loss(draft, head, batch, config)
    # the same sum written out over every position, each step at each counted position
    target = target_distribution(head, batch.last_hidden_state, draft)
    hs = ttt_unroll(draft, batch, 3)
    expected = 0.0
    for s in range(3):
        b, t = counted_positions(batch, target, s).nonzero(as_tuple=True)
        logq = torch.log_softmax(draft.logits(hs[s][b, t]), -1)
        expected = expected + 0.8**s * -(target.probs[b, t + 1 + s] * logq).sum(-1).mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
