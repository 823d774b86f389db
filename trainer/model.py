"""The EAGLE-3 draft, laid out exactly as vLLM and SGLang load it.

    input_norm: RMSNorm(3H)                    only with norm_before_fc: normalises the fc input
    fc:      Linear(3H -> H)                   fuses the target's three aux hidden states
    midlayer: one Llama decoder layer whose attention input is
             cat(input_layernorm(embed(token)), hidden_norm(h))   [.., 2H]
             (so q/k/v_proj take 2H), with the residual taken from h, then
             post_attention_layernorm + SwiGLU MLP
    norm, lm_head: Linear(H -> draft_vocab)
    d2t [draft_vocab] int64, t2d [target_vocab] bool          (see vocab.py)
    embed_tokens: the target's embedding, frozen, not saved (a non-persistent buffer)

Module names are the export names (`midlayer.self_attn.q_proj.weight`, ...), so the state
dict *is* the EAGLE-format checkpoint. One step of the draft is `layer()`; what a step feeds
the next is `recurrent()` (its pre-norm output h, or norm(h) with norm_output); the
training-time-test unroll over several steps lives in loss.py.

norm_before_fc and norm_output ("EAGLE 3.1" normalisation) are named and computed as vLLM's
EAGLE-3 draft (model_executor/models/llama_eagle3.py) names and computes them: vLLM applies
`input_norm` to the concatenated aux states in `combine_hidden_states`, before `fc`, and with
`norm_output` returns the post-norm hidden state as the one it feeds back. Both off, the
draft and its state dict are the plain EAGLE-3 ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import DraftConfig
from trainer.target import TargetArch, TargetWeights, rms_norm
from trainer.vocab import VocabMap


@dataclass(kw_only=True, slots=True)
class DraftArch:
    """The draft's resolved shape: the target's config.json, overridden by DraftConfig."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    # Defaults: what a checkpoint written before these settings existed was trained as.
    norm_before_fc: bool = False
    norm_output: bool = False

    @classmethod
    def resolve(cls, target: TargetArch, config: DraftConfig, *, draft_vocab_size: int) -> DraftArch:
        heads = config.num_attention_heads or target.num_attention_heads
        kv_heads = config.num_key_value_heads or (target.num_key_value_heads if not config.num_attention_heads
                                                  else heads)
        if heads % kv_heads:
            raise ValueError(f"draft.num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads}); set draft.num_key_value_heads")
        return cls(
            hidden_size=target.hidden_size,
            intermediate_size=config.intermediate_size or target.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=config.head_dim or target.head_dim,
            rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta,
            rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
            vocab_size=target.vocab_size,
            draft_vocab_size=draft_vocab_size,
            norm_before_fc=config.norm_before_fc,
            norm_output=config.norm_output,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Llama RoPE inverse frequencies [head_dim/2] (default, linear and llama3 scaling)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported by the draft (supported: default, linear, "
                     "llama3); add it to trainer/model.py:rope_inv_freq")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[..., None].float() * inv_freq  # [B, L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, hd]; cos/sin: [B, L, hd] (HF's rotate-half layout)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# A TTT cache: the (key, value) of every unroll step so far: step 0's [B, kv_heads, L, hd] over
# every position, each later step's [1, kv_heads, n, hd] over the n picked positions (Picked).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# Packed rows are attended in segments cut at sample boundaries, so the scores are [n, n] per
# segment of about this many tokens rather than [L, L] per row (attention never crosses samples,
# so nothing changes but the work: at L = 2048 the whole-row scores were most of a CPU step).
SEGMENT_TOKENS = 512


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L]: query t sees key t' iff t' <= t within the same packed sample."""
    l = doc_ids.shape[1]
    causal = torch.ones(l, l, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same)[:, None]


@dataclass(frozen=True, slots=True)
class Segments:
    """Where a packed batch is cut for attention: spans (row, start, end) that end at sample
    boundaries and hold about `max_tokens` tokens (a longer sample is one span of its own),
    each with its block-causal mask [1, 1, n, n]. Built once per batch, used by every step."""

    spans: tuple[tuple[int, int, int], ...]
    masks: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, doc_ids: torch.Tensor, max_tokens: int = SEGMENT_TOKENS) -> Segments:
        spans = []
        for row, ids in enumerate(doc_ids):
            start = end = 0
            for n in torch.unique_consecutive(ids, return_counts=True)[1].tolist():
                if end > start and end + n - start > max_tokens:
                    spans.append((row, start, end))
                    start = end
                end += n
            spans.append((row, start, end))
        return cls(spans=tuple(spans), masks=tuple(block_causal_mask(doc_ids[r:r + 1, a:e]) for r, a, e in spans))


@dataclass(frozen=True, slots=True)
class Picked:
    """The positions the unroll's steps 1..k-1 run at, laid out as one row [1, n] in row-major
    order. A step-s output at t (s >= 1) reads step 0's keys at t' <= t and its own chain at t
    only, so positions the loss never reads at a later step can be left out of those steps
    without changing any output that is kept (at the demo's shapes ~60% of positions are prompt
    tokens, which no step scores)."""

    flat: torch.Tensor  # [n] ascending indices into the B*L positions
    local: tuple[torch.Tensor, ...]  # per segment span: offsets within the span of its picked positions
    bounds: tuple[tuple[int, int], ...]  # per span: where its picked positions sit in the [1, n] layout

    @classmethod
    def of(cls, active: torch.Tensor, segments: Segments) -> Picked:
        """active: [B, L] bool (the positions to keep)."""
        length, flat, local, bounds, n = active.shape[1], [], [], [], 0
        for r, a, e in segments.spans:
            offsets = active[r, a:e].nonzero().squeeze(1)
            flat.append(offsets + r * length + a)
            local.append(offsets)
            bounds.append((n, n + len(offsets)))
            n += len(offsets)
        return cls(flat=torch.cat(flat), local=tuple(local), bounds=tuple(bounds))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [1, n, ...]"""
        return x.flatten(0, 1)[self.flat][None]

    def scatter(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[1, n, ...] -> [B, L, ...] (zeros where not picked)."""
        full = x.new_zeros(shape[0] * shape[1], *x.shape[2:])
        return full.index_copy(0, self.flat, x[0]).view(*shape[:2], *x.shape[2:])


class Eagle3Attention(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        h, hd = arch.hidden_size, arch.head_dim
        self.heads, self.kv_heads, self.head_dim = arch.num_attention_heads, arch.num_key_value_heads, hd
        self.q_proj = nn.Linear(2 * h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                segments: Segments, picked: Picked | None = None) -> torch.Tensor:
        """Attention of unroll step s = len(cache) (this call appends step s's k/v).

        Position t at step s attends to
          - step 0 keys at positions t' <= t of its own document  (segments' masks), and
          - the keys of steps 1..s at the same position t         (the "diagonal" of each step),
        i.e. exactly what the draft's KV cache holds at inference when it drafts its (s+1)-th
        token after position t: the prefix it processed on the target's features, then its
        own s earlier drafts. Step 0 runs on every position ([B, L, 2H]); steps s >= 1 on the
        picked ones only ([1, n, 2H], `picked`).
        """
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.heads, self.head_dim).transpose(1, 2)  # [b, nh, l, hd]
        k = self.k_proj(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, nkv, l, hd]
        v = self.v_proj(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, nkv, l, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.append((k, v))
        group = self.heads // self.kv_heads
        keys = [kk.repeat_interleave(group, dim=1) for kk, _ in cache]
        values = [vv.repeat_interleave(group, dim=1) for _, vv in cache]
        pieces: list[torch.Tensor] = []
        for i, ((r, a, e), mask) in enumerate(zip(segments.spans, segments.masks, strict=True)):
            if picked is None:  # step 0: the span's queries are its positions a..e-1 of row r
                rows, own, span_mask = (r, a, e), (r, a, e), mask
            else:  # later steps: the span's picked positions, at bounds[i] of the [1, n] layout
                (g0, g1), own = picked.bounds[i], (0, *picked.bounds[i])
                rows, span_mask = (0, g0, g1), mask[:, :, picked.local[i]]
            pieces.append(self._attend(_span(q, rows), _span(keys[0], (r, a, e)), _span(values[0], (r, a, e)),
                                       [_span(kk, own) for kk in keys[1:]], [_span(vv, own) for vv in values[1:]],
                                       span_mask))
        if picked is None:
            out = torch.cat([torch.cat([p for (r, _, _), p in zip(segments.spans, pieces) if r == row], dim=2)
                             for row in range(b)])
        else:
            out = torch.cat(pieces, dim=2)
        out = out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim)
        return self.o_proj(out)  # [b, l, H]

    def _attend(self, q: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor,
                own_keys: list[torch.Tensor], own_values: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """One span: q [1, nh, m, hd] (m queries); step 0's keys/values over the span's n positions
        [1, nh, n, hd]; steps 1..s keys/values at the queries' own positions, each [1, nh, m, hd];
        mask [1, 1, m, n] (which of the n prefix positions each query sees)."""
        n = prefix_keys.shape[2]
        scale = 1.0 / math.sqrt(self.head_dim)
        # scores over the step-0 prefix: [1, nh, m, n]; over each later step's own position: [1, nh, m, 1]
        prefix = (q @ prefix_keys.transpose(-1, -2)) * scale
        prefix = prefix.masked_fill(~mask, float("-inf"))
        diag = [(q * kk).sum(-1, keepdim=True) * scale for kk in own_keys]
        probs = torch.softmax(torch.cat([prefix, *diag], dim=-1).float(), dim=-1).to(q.dtype)  # [1, nh, m, n+s]
        out = probs[..., :n] @ prefix_values  # [1, nh, m, hd]
        for j, vv in enumerate(own_values):
            out = out + probs[..., n + j, None] * vv
        return out


def _span(x: torch.Tensor, where: tuple[int, int, int]) -> torch.Tensor:
    """x[row:row+1, :, start:end] of a [B, heads, L, hd] tensor."""
    r, a, e = where
    return x[r:r + 1, :, a:e]


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        h, eps = arch.hidden_size, arch.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = Eagle3Attention(arch)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = SwiGLU(h, arch.intermediate_size)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache, segments: Segments, picked: Picked | None = None) -> torch.Tensor:
        # embeds, hidden: [B, L, H] (or [1, n, H] picked); attention reads both (2H), the residual stream is hidden.
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [B, L, 2H]
        h = hidden + self.self_attn(x, cos, sin, cache, segments, picked)
        return h + self.mlp(self.post_attention_layernorm(h))  # [B, L, H], before the final norm


class Eagle3Draft(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        self.arch = arch
        h = arch.hidden_size
        # None when off, so a default draft's state dict (and export) has no input_norm at all.
        self.input_norm = RMSNorm(3 * h, arch.rms_norm_eps) if arch.norm_before_fc else None
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = Eagle3DecoderLayer(arch)
        self.norm = RMSNorm(h, arch.rms_norm_eps)
        self.lm_head = nn.Linear(h, arch.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(arch.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(arch.vocab_size, dtype=torch.bool))
        # Frozen and owned by the target: set by attach_target_embedding, never saved.
        self.register_buffer("embed_tokens", None, persistent=False)
        self.register_buffer("inv_freq", rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling),
                             persistent=False)

    @torch.no_grad()
    def init_from_target(self, target: TargetWeights, vocab: VocabMap) -> None:
        """lm_head starts as the target's lm_head rows of the draft ids, norm as the target's
        final norm (so the initial draft head reads hidden states as the target's does)."""
        if vocab.size != self.arch.draft_vocab_size:
            raise ValueError(f"vocab has {vocab.size} ids, the draft was built for {self.arch.draft_vocab_size}")
        self.lm_head.weight.copy_(target.lm_head[vocab.draft_ids])
        self.norm.weight.copy_(target.norm)
        self.d2t.copy_(vocab.d2t)
        self.t2d.copy_(vocab.t2d)
        self.attach_target_embedding(target.embed)

    def attach_target_embedding(self, embed: torch.Tensor) -> None:
        if tuple(embed.shape) != (self.arch.vocab_size, self.arch.hidden_size):
            raise ValueError(f"target embedding has shape {tuple(embed.shape)}, "
                             f"expected {(self.arch.vocab_size, self.arch.hidden_size)}")
        self.embed_tokens = embed.detach().to(self.fc.weight.device)

    @property
    def draft_ids(self) -> torch.Tensor:  # [N] target id of each draft id
        return torch.arange(self.arch.draft_vocab_size, device=self.d2t.device) + self.d2t

    def fuse(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """g = fc(a), a = cat(aux_0, aux_1, aux_2), or fc(input_norm(a)) with norm_before_fc
        (one RMSNorm over all 3H, as vLLM's combine_hidden_states): [B, L, 3, H] -> [B, L, H]."""
        a = aux_hidden_states.flatten(-2).to(self.fc.weight.dtype)  # [B, L, 3H]
        return self.fc(a if self.input_norm is None else self.input_norm(a))

    def recurrent(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden input of the next step (the next TTT step, the next speculative position)
        from a step's output h: h itself, or norm(h) with norm_output (vLLM's `aux_output`).
        The logits are lm_head(norm(h)) either way."""
        return self.norm(hidden) if self.arch.norm_output else hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("the draft has no token embedding: call attach_target_embedding first")
        return F.embedding(input_ids, self.embed_tokens).to(self.fc.weight.dtype)  # [B, L, H]

    def layer(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              segments: Segments, picked: Picked | None = None) -> torch.Tensor:
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return self.midlayer(embeds, hidden, cos, sin, cache, segments, picked)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))  # [..., draft_vocab]
