"""Vision-language and audio-language targets: tiny random-weight Qwen2-VL / Qwen2.5-VL and
Qwen2-Audio built offline, real preprocessing of a generated image and a generated tone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factory.capture import CaptureConfig, CaptureStage
from factory.default_model import DefaultModelConfig, prepare_default
from factory.render import Conversation, RenderConfig, RenderError, Renderer, RenderStatus
from factory.targets import HFTarget, TargetConfig
from tiny_models import build_tiny_qwen2_audio, build_tiny_qwen2_vl
from shared.shards import Dataset, ShardWriter

log = logging.getLogger(__name__)
SAMPLING_RATE = 16000


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The default model from the user's cache (its tokenizer seeds the tiny targets' tokenizers)."""
    return prepare_default(DefaultModelConfig(engine_check=False))


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def vlm(request, smollm_dir, tmp_path_factory) -> HFTarget:
    out = tmp_path_factory.mktemp("vlm") / f"tiny-qwen{request.param}-vl"
    return HFTarget(TargetConfig(model=build_tiny_qwen2_vl(out, tokenizer_dir=smollm_dir, version=request.param),
                                 dtype="float32"))


@pytest.fixture(scope="module")
def audio_lm(smollm_dir, tmp_path_factory) -> HFTarget:
    out = tmp_path_factory.mktemp("alm") / "tiny-qwen2-audio"
    return HFTarget(TargetConfig(model=build_tiny_qwen2_audio(out, tokenizer_dir=smollm_dir), dtype="float32"))


def gradient(width: int, height: int) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def tone(seconds: float, hz: float) -> np.ndarray:
    return np.sin(2 * np.pi * hz * np.arange(int(SAMPLING_RATE * seconds)) / SAMPLING_RATE).astype(np.float32)


def image_rows() -> list[Conversation]:
    return [
        Conversation(source_index=0, messages=[
            {"role": "user", "content": [{"type": "image", "image": gradient(100, 70)},
                                         {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A gradient."}]),
        Conversation(source_index=1, messages=[
            {"role": "user", "content": "A text-only question in the same batch"},
            {"role": "assistant", "content": "A text-only answer, a little longer than the others."}]),
        Conversation(source_index=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                         {"type": "image", "image": gradient(60, 60)},
                                         {"type": "text", "text": "with"},
                                         {"type": "image", "image": gradient(140, 90)}]},
            {"role": "assistant", "content": "The second is wider."},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]),
    ]


def audio_rows() -> list[Conversation]:
    return [
        Conversation(source_index=0, messages=[
            {"role": "user", "content": [{"type": "audio", "audio": tone(1.3, 440)},
                                         {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A tone."}]),
        Conversation(source_index=1, messages=[
            {"role": "user", "content": "A text-only question in the same batch"},
            {"role": "assistant", "content": "A text-only answer, a little longer than the others."}]),
        Conversation(source_index=2, messages=[
            {"role": "user", "content": [{"type": "audio", "audio": tone(0.7, 220)}, {"type": "text", "text": "and"},
                                         {"type": "audio", "audio": {"array": tone(2.1, 880),
                                                                     "sampling_rate": SAMPLING_RATE}}]},
            {"role": "assistant", "content": "Two tones."}]),
    ]


def render_all(target: HFTarget, conversations, **config):
    results = Renderer(target.frontend, RenderConfig(**config))(conversations)
    assert all(r.status is RenderStatus.OK for r in results), [r.reason for r in results]
    return [r.row for r in results]


def assert_batched_equals_single(target: HFTarget, rows) -> dict[str, float]:
    batched = CaptureStage(target, CaptureConfig()).hidden_states(rows)
    single = CaptureStage(target, CaptureConfig(max_batch_size=1)).hidden_states(rows)
    assert rows and len(batched) == len(single) == len(rows)
    for (a, l, p), (a1, l1, p1) in zip(batched, single, strict=True):
        torch.testing.assert_close(a, a1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l, l1, rtol=1e-5, atol=1e-5)
        assert (p is None and p1 is None) or torch.equal(p, p1)
    return {"aux": max((x[0] - y[0]).abs().max().item() for x, y in zip(batched, single, strict=True)),
            "last": max((x[1] - y[1]).abs().max().item() for x, y in zip(batched, single, strict=True))}


# --------------------------------------------------------------------------- images


def test_image_placeholders_expand_to_the_vision_token_count_and_are_not_learned(vlm):
    rows = render_all(vlm, image_rows())
    pad = vlm.frontend.placeholder_ids["image"]
    for row in rows:
        ids, mask = row.input_ids, row.loss_mask
        assert [m.kind for m in row.media] == [k for k, _, _ in row.modality_spans]
        for (kind, start, end), item in zip(row.modality_spans, row.media, strict=True):
            grid = item.tensors["image_grid_thw"][0]
            assert end - start == item.num_tokens == int(grid.prod()) // 4  # 2x2 patches merge into a token
            assert (ids[start:end] == pad).all() and mask[start:end].sum() == 0
            assert vlm.frontend.tokenizer.decode(ids[start - 1]) == "<|vision_start|>"
        assert int((ids == pad).sum()) == sum(e - s for _, s, e in row.modality_spans)
    decode = vlm.frontend.tokenizer.decode
    assert decode(rows[0].input_ids[rows[0].loss_mask.bool()]) == "A gradient.<|im_end|>"
    assert decode(rows[2].input_ids[rows[2].loss_mask.bool()]) == "The second is wider.<|im_end|>Yes.<|im_end|>"
    assert [len(r.media) for r in rows] == [1, 0, 2]


def test_vlm_position_ids_are_the_models_mrope_positions(vlm):
    rows = render_all(vlm, image_rows())
    samples = CaptureStage(vlm, CaptureConfig()).__call__(rows)
    for row, sample in zip(rows, samples, strict=True):
        assert sample.position_ids.shape == (3, row.num_tokens) and sample.position_ids.dtype == torch.int32
        assert sample.modality_spans == row.modality_spans
    # Text-only row: plain positions on all three axes.
    assert torch.equal(samples[1].position_ids, torch.arange(rows[1].num_tokens).expand(3, -1).int())
    # Image rows: the image tokens share a temporal position and spread over height and width,
    # and the text after an image resumes after its largest position.
    pos, (_, start, end) = samples[0].position_ids, rows[0].modality_spans[0]
    assert (pos[0, start:end] == start).all() and pos[1, start:end].max() > start
    assert pos[0, end] == pos[:, start:end].max() + 1


def test_mixed_text_and_image_batch_equals_the_models_own_forward_and_single_rows(vlm):
    rows = render_all(vlm, image_rows())
    diffs = assert_batched_equals_single(vlm, rows)
    log.info("%s batched vs single, float32: %s", vlm.config.model.name, diffs)
    # Against transformers' own path: it builds mRoPE positions and merges image features itself.
    captured = CaptureStage(vlm, CaptureConfig()).hidden_states(rows)
    for row, (aux, last, _) in zip(rows, captured, strict=True):
        token_types = torch.zeros_like(row.input_ids)
        for _, start, end in row.modality_spans:
            token_types[start:end] = 1
        keys = ("pixel_values", "image_grid_thw")
        media = {k: torch.cat([m.tensors[k] for m in row.media]) for k in keys} if row.media else {}
        with torch.inference_mode():
            out = vlm.model(input_ids=row.input_ids[None], mm_token_type_ids=token_types[None],
                            output_hidden_states=True, **media)
        ids = vlm.default_aux_layer_ids
        torch.testing.assert_close(aux, torch.stack([out.hidden_states[i][0] for i in ids], 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vlm.logits(last), out.logits[0], rtol=1e-5, atol=1e-5)


def test_truncation_never_cuts_through_an_image(vlm):
    conv = Conversation(source_index=4, messages=[
        {"role": "user", "content": [{"type": "image", "image": gradient(60, 60)}, {"type": "text", "text": "This?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "image", "image": gradient(140, 90)}, {"type": "text", "text": "And?"}]},
        {"role": "assistant", "content": "A wide one."}])
    full = render_all(vlm, [conv])[0]
    (_, s1, e1), (_, s2, e2) = full.modality_spans
    # A cut at s2 + 2 would land inside the second image: the row ends where that image starts,
    # keeping the first image whole and leaving the second's features out.
    [result] = Renderer(vlm.frontend, RenderConfig(max_length=s2 + 2))([conv])
    row = result.row
    assert result.status is RenderStatus.TRUNCATED and row.truncated
    assert row.num_tokens == s2 and row.modality_spans == [("image", s1, e1)] and len(row.media) == 1
    assert torch.equal(row.media[0].tensors["pixel_values"], full.media[0].tensors["pixel_values"])
    assert row.input_ids.tolist() == full.input_ids[:s2].tolist()
    assert vlm.frontend.tokenizer.decode(row.input_ids[row.loss_mask.bool()]) == "A square.<|im_end|>"
    # The model takes it: as many image features as placeholders.
    [(aux, _, positions)] = CaptureStage(vlm, CaptureConfig()).hidden_states([row])
    assert aux.shape[0] == positions.shape[1] == s2


@pytest.mark.parametrize("part, reason", [
    ({"type": "audio", "audio": np.zeros(16000, np.float32)}, r"content\[0\] is an audio.*takes image"),
    ({"type": "image", "image": "/nonexistent/cat.png"}, r"content\[0\].image: .*No such file"),
    ({"type": "image", "image": np.zeros((8, 8), np.float32)}, r"content\[0\].image: an image must"),
])
def test_media_the_target_cannot_take_is_rejected_naming_the_field(vlm, part, reason):
    conv = Conversation(source_index=5, messages=[{"role": "user", "content": [part]},
                                                  {"role": "assistant", "content": "Hm."}])
    with pytest.raises(RenderError, match=r"row 5: field messages\[0\]." + reason):
        Renderer(vlm.frontend, RenderConfig()).render(conv)


# --------------------------------------------------------------------------- audio


def test_audio_rows_render_like_the_qwen2_audio_processor(audio_lm):
    from transformers import Qwen2AudioProcessor

    rows = render_all(audio_lm, audio_rows())
    tok, template = audio_lm.frontend.tokenizer, audio_lm.frontend.chat_template
    processor = Qwen2AudioProcessor(feature_extractor=audio_lm.frontend.processors["audio"], tokenizer=tok,
                                    chat_template=template)
    conv = audio_rows()[2]
    text = tok.apply_chat_template([{**m, "content": m["content"] if isinstance(m["content"], str) else
                                     [{**p, "audio": "x"} if p["type"] == "audio" else p for p in m["content"]]}
                                    for m in conv.messages], chat_template=template, tokenize=False)
    reference = processor(text=[text], audio=[tone(0.7, 220), tone(2.1, 880)], sampling_rate=SAMPLING_RATE,
                          return_tensors="pt")
    assert rows[2].input_ids.tolist() == reference["input_ids"][0].tolist()
    features = torch.cat([m.tensors["input_features"] for m in rows[2].media])
    assert torch.equal(features, reference["input_features"])
    audio_id = audio_lm.frontend.placeholder_ids["audio"]
    for row in rows:
        for kind, start, end in row.modality_spans:
            assert kind == "audio" and (row.input_ids[start:end] == audio_id).all()
            assert row.loss_mask[start:end].sum() == 0
    assert [e - s for _, s, e in rows[0].modality_spans] == [32]  # 1.3 s = 130 mel frames -> 65 -> 32 tokens
    assert tok.decode(rows[2].input_ids[rows[2].loss_mask.bool()]) == "Two tones.<|im_end|>"


def test_mixed_text_and_audio_batch_equals_the_models_own_forward_and_single_rows(audio_lm):
    rows = render_all(audio_lm, audio_rows())
    diffs = assert_batched_equals_single(audio_lm, rows)
    log.info("qwen2-audio batched vs single, float32: %s", diffs)
    captured = CaptureStage(audio_lm, CaptureConfig()).hidden_states(rows)
    for row, (aux, last, positions) in zip(rows, captured, strict=True):
        assert positions is None
        keys = ("input_features", "feature_attention_mask")
        media = {k: torch.cat([m.tensors[k] for m in row.media]) for k in keys} if row.media else {}
        with torch.inference_mode():
            out = audio_lm.model(input_ids=row.input_ids[None], output_hidden_states=True, **media)
        ids = audio_lm.default_aux_layer_ids
        torch.testing.assert_close(aux, torch.stack([out.hidden_states[i][0] for i in ids], 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(audio_lm.logits(last), out.logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seconds, reason", [(0.01, "at least 2 are needed"), (31.0, "longer than the 30 s")])
def test_audio_outside_the_encoders_range_is_rejected(audio_lm, seconds, reason):
    conv = Conversation(source_index=9, messages=[
        {"role": "user", "content": [{"type": "audio", "audio": tone(seconds, 440)}]},
        {"role": "assistant", "content": "Hm."}])
    [result] = Renderer(audio_lm.frontend, RenderConfig())([conv])
    assert result.status is RenderStatus.REJECTED and reason in result.reason
    assert result.reason.startswith("field messages[0].content[0].audio")


# --------------------------------------------------------------------------- shards


def round_trip(target: HFTarget, conversations, directory: Path) -> None:
    stage = CaptureStage(target, CaptureConfig())
    samples = stage(render_all(target, conversations))
    assert samples and len(samples) == len(conversations)
    with ShardWriter(directory, stage.header) as writer:
        for s in samples:
            writer.add(s)
    for s, got in zip(samples, Dataset(directory), strict=True):
        assert got["modality_spans"] == s.modality_spans
        assert torch.equal(got["aux_hidden_states"], s.aux_hidden_states)
        if s.position_ids is None:
            assert "position_ids" not in got
        else:
            assert torch.equal(got["position_ids"], s.position_ids)


def test_image_samples_round_trip_with_positions_and_spans(vlm, tmp_path):
    round_trip(vlm, image_rows(), tmp_path)


def test_audio_samples_round_trip_with_spans(audio_lm, tmp_path):
    round_trip(audio_lm, audio_rows(), tmp_path)
