"""`specmill eval --engine torch`: greedy speculative decoding in plain PyTorch.

One round, for tokens x_0..x_{n-1} whose target KV cache holds positions 0..n-2:

    propose  d_1..d_m                 (eagle3: m = k always; ngram: m = 0 when nothing matches)
    verify   target([x_{n-1}, d_1..d_m]) at positions n-1..n-1+m, ONE forward -> greedy g_0..g_m
             (g_i = the target's argmax for position n+i, given x_<n and d_1..d_i)
    accept   a = max{i : d_j == g_{j-1} for all j <= i};  append d_1..d_a and the bonus g_a
    rollback target cache to positions 0..n-1+a; the draft drops its chained entries next round

Every appended token is a target argmax given the tokens before it, so the output is plain
greedy decoding's, token for token; each round costs one target forward for 1 + a tokens.
Way "none" is the same loop with no proposer (m = 0: one forward per token, KV cached), so
the speedup is measured inside this engine.

Counting follows vLLM's scheduler so the figures compare: a round with m > 0 is one draft
of m draft tokens with a accepted (counted before EOS or max_tokens cut the round's tokens),
and accepted positions 0..a-1 each count once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from trainer.model import Eagle3Draft, apply_rope, rope_cos_sin

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(slots=True)
class SpecStats:
    """Draft rounds and acceptance, counted as vLLM's /metrics counts them."""
    k: int
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    forwards: int = 0  # target forward passes (prefills included)
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.forwards += 1
        if proposed == 0:
            return
        self.drafts += 1
        self.draft_tokens += proposed
        self.accepted += accepted
        if len(self.accepted_per_pos) < self.k:
            self.accepted_per_pos.extend([0] * (self.k - len(self.accepted_per_pos)))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1


class Proposer(Protocol):
    needs_aux: bool  # whether propose() reads the target's aux hidden states

    def reset(self) -> None: ...

    def propose(self, tokens: list[int], aux: torch.Tensor | None, start: int) -> list[int]:
        """Up to k draft tokens to follow `tokens`. aux [n, 3, H]: the target's features at
        positions start..start+n-1, newly verified since the last call (their next tokens are
        tokens[start+1 .. start+n])."""
        ...


class NoProposer:
    """Plain greedy decoding: nothing proposed, one target forward per token."""
    needs_aux = False

    def reset(self) -> None:
        pass

    def propose(self, tokens: list[int], aux: torch.Tensor | None, start: int) -> list[int]:
        return []


@dataclass(slots=True)
class NgramProposer:
    """Prompt lookup as vLLM's n-gram proposer does it: the longest suffix n-gram (min_n <= n <=
    max_n) that occurs earlier in prompt + output, its earliest occurrence, the (up to) k tokens
    after it."""
    k: int
    min_n: int
    max_n: int
    needs_aux: bool = False

    def reset(self) -> None:
        pass

    def propose(self, tokens: list[int], aux: torch.Tensor | None, start: int) -> list[int]:
        total = len(tokens)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            for i in range(total - n):  # the match ends before the suffix itself: i + n <= total - 1
                if tokens[i:i + n] == suffix:
                    return tokens[i + n:i + n + self.k]
        return []


class EagleProposer:
    """The EAGLE-3 draft with its own KV cache, carried across rounds and across its k chained
    steps (as a depth transformer carries its own), so no draft position is computed twice.

    Cache: keys/values [1, nkv, T, hd]; entry t has rope position t. Per round, with the target
    features aux_t newly known for t in [v0, v1):
      step 0   crop the cache to v0 (drop last round's chained entries), then run positions
               v0..v1-1 at once: token x_{t+1}, hidden h^0_t = draft.fuse(aux_t); query t attends
               to entries 0..t (causal). Its output at v1-1 gives d_1.
      step s   (s = 1..k-1) one position v1-1+s: token d_s, hidden h^s = draft.recurrent(step
               s-1's output), i.e. that output, or its norm with norm_output; attends to entries
               0..v1-1 (the prefix, step 0's) and v1..v1-1+s (its own chain). That is
               training's TTT pattern (loss.py): at draft position t, step s sees step-0 keys
               at t' <= t plus steps 1..s at t, with rope position t + s.
    d_s = argmax over the draft vocab of lm_head(norm(o)), o = step s-1's output, mapped to a
    target id with d2t.
    """
    needs_aux = True

    def __init__(self, draft: Eagle3Draft, k: int):
        self.draft, self.k = draft, k
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def reset(self) -> None:
        self.keys = self.values = None

    def propose(self, tokens: list[int], aux: torch.Tensor | None, start: int) -> list[int]:
        n = aux.shape[0]  # aux: [n, 3, H]
        ids = torch.tensor([tokens[start + 1:start + 1 + n]])  # x_{t+1}: [1, n]
        hidden = self.draft.fuse(aux[None])  # h^0 = fc(aux): [1, n, H]
        positions = torch.arange(start, start + n)  # [n]
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :start], self.values[:, :, :start]
        proposals = []
        for _ in range(self.k):
            out = self.layer(ids, hidden, positions)[:, -1:]  # step s's output at the chain's head: [1, 1, H]
            best = int(self.draft.logits(out)[0, 0].argmax())  # a draft-vocab index
            proposals.append(best + int(self.draft.d2t[best]))  # target id = i + d2t[i]
            ids, positions, hidden = torch.tensor([[proposals[-1]]]), positions[-1:] + 1, self.draft.recurrent(out)
        return proposals

    def layer(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The draft's decoder layer on n new positions, appending their k/v: [1, n, H] -> [1, n, H]."""
        layer, attn = self.draft.midlayer, self.draft.midlayer.self_attn
        n = ids.shape[1]
        x = torch.cat([layer.input_layernorm(self.draft.embed(ids)), layer.hidden_norm(hidden)], -1)  # [1, n, 2H]
        q = attn.q_proj(x).view(1, n, attn.heads, attn.head_dim).transpose(1, 2)  # [1, nh, n, hd]
        k = attn.k_proj(x).view(1, n, attn.kv_heads, attn.head_dim).transpose(1, 2)  # [1, nkv, n, hd]
        v = attn.v_proj(x).view(1, n, attn.kv_heads, attn.head_dim).transpose(1, 2)  # [1, nkv, n, hd]
        cos, sin = rope_cos_sin(positions[None], self.draft.inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cached = 0 if self.keys is None else self.keys.shape[2]
        if cached != int(positions[0]):
            raise RuntimeError(f"draft cache holds {cached} positions, the next one is {int(positions[0])}")
        self.keys = k if self.keys is None else torch.cat([self.keys, k], 2)  # [1, nkv, T, hd]
        self.values = v if self.values is None else torch.cat([self.values, v], 2)
        visible = torch.arange(self.keys.shape[2]) <= positions[:, None]  # [n, T]: query p sees entries <= p
        out = F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=visible,
                                             enable_gqa=attn.heads != attn.kv_heads)  # [1, nh, n, hd]
        h = hidden + attn.o_proj(out.transpose(1, 2).reshape(1, n, attn.heads * attn.head_dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))  # pre-norm output: [1, n, H]


class Target:
    """A transformers causal LM with its DynamicCache: greedy next tokens (and aux features) for
    new positions, and rollback by cropping the cache."""

    def __init__(self, model: Any, aux_layer_ids: tuple[int, ...]):
        self.model, self.aux_layer_ids = model, tuple(aux_layer_ids)
        self.cache: Any = None

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        # sliding-window layers (Gemma, Mistral) otherwise drop states a rollback needs
        self.cache.activate_past_recording()

    def forward(self, ids: list[int], *, want_aux: bool, last_only: bool = False
                ) -> tuple[list[int], torch.Tensor | None]:
        """Greedy ids [n] (or [1] with last_only) and aux [n, 3, H] (HF output_hidden_states[i] =
        the residual entering layer i, vLLM's numbering) for `ids` at the next positions."""
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True,
                         output_hidden_states=want_aux, logits_to_keep=1 if last_only else 0)
        self.cache = out.past_key_values
        aux = torch.stack([out.hidden_states[i][0] for i in self.aux_layer_ids], 1) if want_aux else None
        return out.logits[0].argmax(-1).tolist(), aux

    def crop(self, length: int) -> None:
        """Keep positions 0..length-1."""
        if (drop := self.cache.get_seq_length() - length) > 0:
            self.cache.crop(-drop)


@torch.inference_mode()
def generate(target: Target, proposer: Proposer, prompt: list[int], *, max_tokens: int, eos_ids: set[int],
             stats: SpecStats) -> list[int]:
    """The greedy completion of `prompt` (ids), by speculative decoding; EOS included if reached."""
    target.reset()
    proposer.reset()
    tokens = list(prompt)
    greedy, aux = target.forward(tokens, want_aux=proposer.needs_aux, last_only=True)  # prefill 0..P-1
    stats.record(0, 0)
    new, start = greedy[-1:], 0  # aux rows are positions start..start+len(aux)-1
    while not _extend(tokens, new, len(prompt) + max_tokens, eos_ids):
        drafts = proposer.propose(tokens, aux, start)  # d_1..d_m
        n = len(tokens)  # the target cache holds positions 0..n-2
        greedy, aux = target.forward([tokens[-1], *drafts], want_aux=proposer.needs_aux)  # n-1..n-1+m: g_0..g_m
        a = next((i for i, d in enumerate(drafts) if d != greedy[i]), len(drafts))  # longest agreeing prefix
        target.crop(n + a)  # keep positions 0..n-1+a, the rejected drafts' entries go
        stats.record(len(drafts), a)
        new, start = [*drafts[:a], greedy[a]], n - 1
        aux = None if aux is None else aux[:a + 1]  # features of n-1..n-1+a: the draft's next step-0 input
    return tokens[len(prompt):]


def _extend(tokens: list[int], new: list[int], limit: int, eos_ids: set[int]) -> bool:
    """Append `new` up to `limit` tokens or an EOS; True when the sequence is finished."""
    for token in new:
        tokens.append(token)
        if token in eos_ids or len(tokens) >= limit:
            return True
    return len(tokens) >= limit


def load_target_model(path: Path, dtype: torch.dtype) -> Any:
    """The class the target's config.json names (LlamaForCausalLM, Qwen2VLForConditionalGeneration,
    Qwen2AudioForConditionalGeneration, ...), so VLM and audio targets load as what they are and
    decode from token ids; AutoModelForCausalLM when the config names none."""
    import transformers

    names = json.loads((Path(path) / "config.json").read_text()).get("architectures") or ["AutoModelForCausalLM"]
    if (cls := getattr(transformers, names[0], None)) is None:
        raise ValueError(f"{path}/config.json: architectures[0] = {names[0]!r} is not a class of the installed "
                         f"transformers {transformers.__version__}")
    return cls.from_pretrained(path, dtype=dtype).eval()
