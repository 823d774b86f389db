"""Helpers shared by the trainer tests (a module of its own so test files can import it
whichever way pytest is started): a tiny random Llama target, data sets made from it, and
the small training config most tests start from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from shared.manifest import DatasetHeader, TargetInfo
from shared.shards import Sample, ShardWriter

HIDDEN, LAYERS, VOCAB = 64, 4, 512
AUX_IDS = (1, 2, 3)  # HF output_hidden_states[i] = residual entering layer i


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, vocab_size=VOCAB, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    tie_word_embeddings=False,
                    # a wide init makes the random target's next-token distributions peaked
                    initializer_range=0.25)
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_target(out: Path, **overrides) -> Path:
    """A random Llama saved as a HF directory. Its layers' output projections are scaled
    down so the residual stream is mostly the current token's embedding: the next-token
    distribution then depends mostly on recent tokens, which a one-layer draft can learn in
    tens of steps (a plain random model's depends chaotically on the whole prefix)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
    model.save_pretrained(out)
    return out


def capture(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the HF target on [1, T] ids; returns (aux [T, 3, H], pre-norm last [T, H], logits [T, V])."""
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda mod, args, out: captured.update(pre_norm=args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids, output_hidden_states=True)
    finally:
        hook.remove()
    aux = torch.stack([out.hidden_states[i][0] for i in AUX_IDS], dim=1)
    return aux, captured["pre_norm"][0], out.logits[0]


def write_self_generated(out: Path, target: Path, *, samples: int, prompt_len: int = 6, new_tokens: int = 42) -> Path:
    """Samples the target wrote itself (answers sampled at temperature 0.5 after random
    prompts) with its real hidden states: the factory's output in miniature."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(target).eval()
    cfg = model.config
    fingerprint = hashlib.sha256(str(target).encode()).hexdigest()
    header = DatasetHeader(
        target=TargetInfo(name=target.name, config_sha256=fingerprint, tokenizer_sha256=fingerprint,
                          chat_template_sha256=fingerprint, vocab_size=cfg.vocab_size,
                          num_hidden_layers=cfg.num_hidden_layers),
        hidden_size=cfg.hidden_size, dtype="bfloat16", aux_layer_ids=AUX_IDS,
        aux_layer_convention="residual_entering_layer", last_hidden_state="pre_norm")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (samples, prompt_len), generator=generator)
    with torch.no_grad():
        for _ in range(new_tokens):  # the whole batch at once: one forward per new token
            probs = torch.softmax(model(ids).logits[:, -1] / 0.5, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    with ShardWriter(out, header, shard_bytes=256 << 10) as writer:
        for index in range(samples):
            n = ids.shape[1] - index % 7  # some length variety
            aux, last, _ = capture(model, ids[index:index + 1, :n])
            mask = torch.zeros(n, dtype=torch.uint8)
            mask[prompt_len:] = 1
            writer.add(Sample(sample_id=f"real-{index}", source_index=index, input_ids=ids[index, :n].int(),
                              loss_mask=mask, aux_hidden_states=aux.bfloat16().contiguous(),
                              last_hidden_state=last.bfloat16().contiguous()))
        writer.close()
    return out


def run_config(out: Path, data: Path, target: Path, **overrides):
    """A small, fast run; overrides are dotted config fields."""
    from trainer.config import load_config

    settings = {"out": out, "steps": 30, "data.path": data, "target.path": target, "data.token_budget": 160,
                "draft.draft_vocab_size": 200, "ttt.steps": 3, "optim.lr": 1e-3, "progress": False,
                "log_every": 1, "checkpoint.every": 7, "seed": 5,
                # the same arithmetic on every CPU ("auto" is bf16 on CPUs with AMX/AVX512-BF16)
                "precision": "fp32"}
    settings.update(overrides)
    return load_config(None, settings)


def export_eagle(checkpoint: Path, out: Path, *, dtype: str = "bfloat16") -> Path:
    """`specmill export --format eagle`, as the tests call it."""
    from trainer.export import export

    return export(checkpoint, out, format="eagle", dtype=dtype)
