"""Tiny random-weight targets, built offline from transformers configs, for tests.

They reuse a real tokenizer (the default model's, with the media tokens a family needs
added) and real preprocessors (PIL image processor, numpy Whisper feature extractor), so
rendering, placeholder expansion and capture run exactly as for a real checkpoint; only
the weights are random. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2-VL's template, cut down to what it does with text and images: a default system
# prompt, then each image as <|vision_start|><|image_pad|><|vision_end|> in place.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
AUDIO_TOKENS = ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")
# Small enough for a CPU test, with head_dim 16 so mRoPE's sections (2+3+3 = 16/2) fit.
TEXT_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)


def _tokenizer(tokenizer_dir: Path, extra: tuple[str, ...] = ()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def _token_ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def build_tiny_causal_lm(model_type: str, out: Path, *, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny `model_type` causal LM (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer(tokenizer_dir)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), head_dim=16, **TEXT_DIMS, **_token_ids(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def build_tiny_qwen2_vl(out: Path, *, tokenizer_dir: Path, version: str = "2", seed: int = 0) -> Path:
    """A tiny Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") with a PIL image processor."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(tokenizer_dir, VISION_TOKENS)
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tok.convert_tokens_to_ids(list(VISION_TOKENS))))
    text = dict(vocab_size=len(tok), **TEXT_DIMS, **_token_ids(tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if version == "2":
        config = transformers.Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            **ids)
        model_class = transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]),
            **ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    torch.manual_seed(seed)
    model_class(config).save_pretrained(out)
    tok.save_pretrained(out)
    (Path(out) / "chat_template.jinja").write_text(QWEN_VL_TEMPLATE)
    # 4 to 16 LM tokens per image: images stay small, the test sequences short.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(out)
    return Path(out)


def build_tiny_qwen2_audio(out: Path, *, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny Qwen2-Audio (2-layer Whisper-style encoder, Qwen2 LM) with the real feature extractor
    and Qwen2-Audio's own chat template."""
    import torch
    import transformers

    tok = _tokenizer(tokenizer_dir, AUDIO_TOKENS)
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT_DIMS, **_token_ids(tok)),
        audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(seed)
    transformers.Qwen2AudioForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    features = transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    features.save_pretrained(out)
    processor = transformers.Qwen2AudioProcessor(feature_extractor=features, tokenizer=tok)
    (Path(out) / "chat_template.jinja").write_text(processor.chat_template)
    return Path(out)
