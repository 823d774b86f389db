"""What the trainer needs from the target model: a few config.json fields and three frozen
tensors (token embedding, final norm, lm_head), read from its safetensors by name without
loading the rest of the model."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("specmill.trainer")

# Where the three tensors live in HF checkpoints of text models and of VLMs that wrap one.
_EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                "language_model.model.embed_tokens.weight")
_NORM_NAMES = ("model.norm.weight", "model.language_model.norm.weight", "language_model.model.norm.weight")
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


@dataclass(kw_only=True, slots=True)
class TargetArch:
    """The target's config.json fields the draft is built from."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    vocab_size: int
    num_hidden_layers: int
    tie_word_embeddings: bool
    hidden_act: str

    @classmethod
    def from_config_json(cls, path: Path) -> TargetArch:
        file = path / "config.json"
        try:
            cfg = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: no config.json; target.path must be a HF model directory") from None
        cfg = cfg.get("text_config", cfg)  # VLMs nest the language model's config

        def need(name: str) -> Any:
            if name not in cfg:
                raise ValueError(f"{file}: missing field {name!r} (needed to size the draft)")
            return cfg[name]

        # transformers >= 5 writes rope settings as `rope_parameters`; older files use
        # `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta")
        if theta is None:
            raise ValueError(f"{file}: no rope_theta (nor rope_parameters.rope_theta)")
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        heads = need("num_attention_heads")
        return cls(
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
            rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=need("max_position_embeddings"),
            vocab_size=need("vocab_size"),
            num_hidden_layers=need("num_hidden_layers"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=cfg.get("hidden_act", "silu"),
        )


@dataclass(kw_only=True, slots=True)
class TargetWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]


def load_target_weights(path: Path, arch: TargetArch, *, dtype: torch.dtype | None = None) -> TargetWeights:
    """Read only the embedding, final norm and lm_head from the target's safetensors."""
    from safetensors import safe_open

    where = _tensor_index(path)

    def get(names: tuple[str, ...], what: str) -> torch.Tensor:
        for name in names:
            if name in where:
                with safe_open(str(path / where[name]), framework="pt") as f:
                    t = f.get_tensor(name)
                return t.to(dtype) if dtype is not None else t
        raise ValueError(f"{path}: no {what} tensor in the safetensors (looked for {', '.join(names)})")

    embed = get(_EMBED_NAMES, "token embedding")
    norm = get(_NORM_NAMES, "final norm")
    lm_head = embed if arch.tie_word_embeddings else get(_LM_HEAD_NAMES, "lm_head")
    v, h = arch.vocab_size, arch.hidden_size
    for name, t, shape in (("embedding", embed, (v, h)), ("final norm", norm, (h,)), ("lm_head", lm_head, (v, h))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, config.json implies {shape}")
    return TargetWeights(embed=embed, norm=norm, lm_head=lm_head)


def target_fingerprint(path: Path) -> str:
    """sha256 of config.json and of every safetensors header (tensor names, dtypes, shapes,
    offsets): cheap, and changes when the checkpoint is swapped for another one."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(set(_tensor_index(path).values())):
        with open(path / file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            digest.update(file.encode() + f.read(n))
    return digest.hexdigest()


class TargetHead(nn.Module):
    """The target's frozen output head: logits = lm_head(norm(h)) (norm only for pre-norm h)."""

    def __init__(self, weights: TargetWeights, *, eps: float, pre_norm: bool):
        super().__init__()
        self.eps, self.pre_norm = eps, pre_norm
        self.register_buffer("norm_weight", weights.norm, persistent=False)
        self.register_buffer("lm_head_weight", weights.lm_head, persistent=False)
        self._split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        return self.normed(last_hidden_state) @ self.lm_head_weight.T  # [..., V]

    def normed(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """What the head multiplies: norm(h) for a pre-norm h, else h, in the head's dtype."""
        h = last_hidden_state  # [..., H]
        if self.pre_norm:
            h = rms_norm(h.to(self.norm_weight.dtype), self.norm_weight, self.eps)
        return h.to(self.lm_head_weight.dtype)

    def split(self, draft_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(the lm_head rows of draft_ids [N, H], the other rows [V - N, H]) in `dtype`, made
        once: logits over the draft vocab and the best logit outside it are two matmuls that
        together cost one full-vocab matmul, with no [*, V] gather and no per-call weight cast."""
        cached = self._split
        if cached is None or cached[0].dtype != dtype or not torch.equal(cached[2], draft_ids):
            rest = torch.ones(self.lm_head_weight.shape[0], dtype=torch.bool, device=draft_ids.device)
            rest[draft_ids] = False
            w = self.lm_head_weight.to(dtype)
            self._split = cached = (w[draft_ids].contiguous(), w[rest].contiguous(), draft_ids.clone())
        return cached[0], cached[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, computed in fp32 and cast back, as HF does (bit-for-bit on fp32)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _tensor_index(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single.name for name in f.keys()}
