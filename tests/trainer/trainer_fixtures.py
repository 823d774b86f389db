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


def save_copy_target(out: Path, *, prompt_vocab: int = 48) -> Path:
    """A tiny Llama built by hand whose greedy next token is the token before the current one
    (prompt ... a b -> a b a b ...), so a draft can predict it only from the target's hidden
    states: the token a draft must propose, x_{t+2} = x_t, is in aux_t (fc's input), while the
    token embedding the draft reads (the target's, shared) carries token identity only at 1% of
    its scale, too faint for a briefly trained draft to use. A zeroed fc then drops acceptance
    to chance, as it would for a real target.

    Residual stream (H = 64): dim 0 = 1 (a constant for attention to key on), dims 1-16 = the
    token's code u_x at scale EPS (the embedding), 17-32 = u_x at full scale, 33-48 = the
    previous token's u. Layer 0 has two attention heads keyed on the constant, one peaked by
    RoPE at distance 0 and one at distance 1, copying u into 17-32 and 33-48; lm_head reads
    33-48. Every other weight is zero, so layers 1-3 pass the stream on. Tokens >= prompt_vocab
    have no code: the target never predicts them, so prompts drawn below it keep every token a
    draft sees in its vocabulary."""
    import math

    from transformers import LlamaForCausalLM

    eps, sharpness, head_scale = 0.01, 60.0, 20.0
    config = tiny_llama_config()
    h, v, hd = config.hidden_size, config.vocab_size, config.head_dim
    code, copy, prev = slice(1, 1 + hd), slice(1 + hd, 1 + 2 * hd), slice(1 + 2 * hd, 1 + 3 * hd)
    u = torch.zeros(v, hd)
    u[:prompt_vocab] = torch.nn.functional.normalize(torch.randn(prompt_vocab, hd,
                                                                 generator=torch.Generator().manual_seed(0)), dim=1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.embed_tokens.weight[:, code] = eps * u
        attn = model.model.layers[0].self_attn
        rms = math.sqrt((1 + eps**2) / h)  # input_layernorm divides the embedding by its rms
        base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta
        theta = base ** (-torch.arange(0, hd, 2).float() / hd)  # [hd/2], HF's rotary frequencies
        # score(q at m, k at n) = sharpness * sum_i cos((m - n - d) theta_i): largest at m - n = d
        for q_head, kv_head, d, into in ((0, 0, 1, prev), (2, 1, 0, copy)):
            rows = slice(q_head * hd, (q_head + 1) * hd)
            attn.q_proj.weight[rows, 0] = sharpness * rms * torch.cat([torch.cos(d * theta), -torch.sin(d * theta)])
            kv = slice(kv_head * hd, (kv_head + 1) * hd)
            attn.k_proj.weight[kv, 0] = rms * torch.cat([torch.ones(hd // 2), torch.zeros(hd // 2)])
            attn.v_proj.weight[kv, code] = torch.eye(hd) * rms / eps
            attn.o_proj.weight[into, rows] = torch.eye(hd)
        model.lm_head.weight[:, prev] = head_scale * u
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


def write_self_generated(out: Path, target: Path, *, samples: int, prompt_len: int = 6, new_tokens: int = 42,
                         prompt_vocab: int | None = None) -> Path:
    """Samples the target wrote itself (answers sampled at temperature 0.5 after random
    prompts, of ids below prompt_vocab if given) with its real hidden states: the factory's
    output in miniature."""
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
    ids = torch.randint(0, prompt_vocab or cfg.vocab_size, (samples, prompt_len), generator=generator)
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


# --- the default target (SmolLM2-135M-Instruct; `slow` tests) ---------------------------------

DEFAULT_AUX_IDS = (2, 15, 27)  # vLLM's default for a 30-layer target: residual entering those layers
QUESTIONS = [
    "List the days of the week in order.", "Explain why the sky is blue.", "What is the capital of France?",
    "Write a short poem about the sea.", "Count from one to twenty in words.", "Describe how to boil an egg.",
    "Name three primary colours.", "What does a compiler do?",
]


def build_default_dataset(target: Path, out: Path) -> None:
    """The target's own greedy answers to QUESTIONS with its real hidden states (via transformers):
    the factory's output in miniature, small enough to build in minutes on 2 shared cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    cfg = model.config
    digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    header = DatasetHeader(
        target=TargetInfo(name=target.name, config_sha256=digest(target / "config.json"),
                          tokenizer_sha256=digest(target / "tokenizer.json"),
                          chat_template_sha256=hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
                          vocab_size=cfg.vocab_size, num_hidden_layers=cfg.num_hidden_layers),
        hidden_size=cfg.hidden_size, dtype="bfloat16", aux_layer_ids=DEFAULT_AUX_IDS,
        aux_layer_convention="residual_entering_layer", last_hidden_state="pre_norm")
    with ShardWriter(out, header) as writer, torch.no_grad():
        for index, question in enumerate(QUESTIONS):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
            ids = model.generate(prompt, max_new_tokens=32, do_sample=False)
            captured = {}
            hook = model.model.norm.register_forward_hook(lambda mod, args, o: captured.update(pre_norm=args[0]))
            try:
                hidden = model(ids, output_hidden_states=True).hidden_states
            finally:
                hook.remove()
            n = ids.shape[1]
            mask = torch.zeros(n, dtype=torch.uint8)
            mask[prompt.shape[1]:] = 1
            writer.add(Sample(sample_id=f"default-{index}", source_index=index, input_ids=ids[0].int(),
                              loss_mask=mask,
                              aux_hidden_states=torch.stack([hidden[i][0] for i in DEFAULT_AUX_IDS], 1).bfloat16(),
                              last_hidden_state=captured["pre_norm"][0].bfloat16().contiguous()))
        writer.close()
