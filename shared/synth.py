"""Synthetic shard data sets that look like real captures, for tests and benchmarks.

Real residual streams are not unit Gaussians: each channel has its own scale, a handful of
"massive activation" channels are 10-100x larger than the rest, deeper layers are larger,
and sequence lengths are long-tailed. Compression ratios and read costs depend on that, so
the generator reproduces it rather than writing zeros or uniform noise.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from shared.manifest import DatasetHeader, Manifest, TargetInfo, default_aux_layer_ids
from shared.shards import DEFAULT_SHARD_BYTES, Sample, ShardWriter


@dataclass(kw_only=True, slots=True)
class SynthConfig:
    samples: int
    hidden_size: int
    seed: int = 0
    mean_tokens: int = 512
    max_tokens: int = 4096
    vocab: int = 49152
    num_layers: int = 30
    dtype: str = "bfloat16"
    shard_bytes: int = DEFAULT_SHARD_BYTES

    def __post_init__(self) -> None:
        for name in ("samples", "hidden_size", "mean_tokens", "max_tokens", "vocab", "num_layers", "shard_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"synth: {name} must be positive, got {getattr(self, name)}")
        if self.mean_tokens > self.max_tokens:
            raise ValueError(f"synth: mean_tokens ({self.mean_tokens}) exceeds max_tokens ({self.max_tokens})")

    def header(self) -> DatasetHeader:
        fingerprint = hashlib.sha256(f"synthetic-{self.hidden_size}-{self.vocab}".encode()).hexdigest()
        return DatasetHeader(
            target=TargetInfo(name="synthetic", config_sha256=fingerprint, tokenizer_sha256=fingerprint,
                              chat_template_sha256=fingerprint, vocab_size=self.vocab,
                              num_hidden_layers=self.num_layers),
            hidden_size=self.hidden_size,
            dtype=self.dtype,
            aux_layer_ids=default_aux_layer_ids(self.num_layers),
        )


def synthetic_samples(config: SynthConfig):
    """Yield `config.samples` Samples, deterministic in `config.seed`."""
    import torch

    rng = np.random.default_rng(config.seed)
    h = config.hidden_size
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
    # Per-channel scales, lognormal, plus a few massive channels; layer l gets scale * (1 + l/4).
    scales = rng.lognormal(0.0, 0.5, size=(4, h)).astype(np.float32)
    massive = rng.choice(h, size=max(1, h // 512), replace=False)
    scales[:, massive] *= rng.uniform(10, 100, size=massive.size).astype(np.float32)
    scales *= (1 + np.arange(4, dtype=np.float32) / 4)[:, None]
    scales_t = torch.from_numpy(scales)
    # Zipf-like token ids: real text reuses a small part of the vocabulary.
    ranks = np.arange(1, config.vocab + 1, dtype=np.float64)
    token_p = 1 / ranks**1.1
    token_p /= token_p.sum()
    token_perm = rng.permutation(config.vocab)
    sigma = 0.6
    mu = np.log(config.mean_tokens) - sigma**2 / 2
    generator = torch.Generator().manual_seed(config.seed)
    for index in range(config.samples):
        t = int(np.clip(rng.lognormal(mu, sigma), 8, config.max_tokens))
        ids = token_perm[rng.choice(config.vocab, size=t, p=token_p)]
        # A prompt then an answer; the answer's tokens are the ones the draft learns.
        prompt = int(rng.integers(1, max(2, t // 2)))
        mask = np.zeros(t, dtype=np.uint8)
        mask[prompt:] = 1
        states = torch.randn(t, 4, h, generator=generator) * scales_t  # [T, 4, H]
        states = states.to(dtype)
        yield Sample(
            sample_id=hashlib.sha256(f"synth:{config.seed}:{index}".encode()).hexdigest()[:32],
            source_index=index,
            input_ids=torch.from_numpy(ids.astype(np.int32)),
            loss_mask=torch.from_numpy(mask),
            aux_hidden_states=states[:, :3].contiguous(),  # [T, 3, H]
            last_hidden_state=states[:, 3].contiguous(),  # [T, H]
            temperature=float(rng.choice([0.0, 0.7, 1.0])),
            finish_reason="stop",
        )


def write_synthetic(out: str | os.PathLike, config: SynthConfig, *, progress: bool = False) -> Manifest:
    writer = ShardWriter(out, config.header(), shard_bytes=config.shard_bytes)
    for sample in tqdm(synthetic_samples(config), total=config.samples, desc="synth", unit="sample",
                       disable=not progress):
        writer.add(sample)
    return writer.close(info={"synthetic": {"seed": config.seed, "mean_tokens": config.mean_tokens}})
