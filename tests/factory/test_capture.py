"""Hidden-state capture through transformers: conventions, exactness of batching, shard output."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest
import torch

from factory.capture import CaptureConfig, CaptureStage, length_buckets
from factory.default_model import DefaultModelConfig, prepare_default
from factory.render import Conversation, RenderConfig, Renderer
from factory.rows import RowFailure
from factory.targets import HFTarget, TargetConfig, TargetError, spec_for
from tiny_models import build_tiny_causal_lm
from shared.hardware import resolve_model_dtype
from shared.shards import Dataset, Sample, ShardWriter

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The default model from the user's cache (prepared there with the transformers check only if
    missing). Not conftest's `default_model_dir`, which prepares a fresh copy and starts vLLM."""
    return prepare_default(DefaultModelConfig(engine_check=False))


@pytest.fixture(scope="module")
def smollm32(smollm_dir: Path) -> HFTarget:
    return HFTarget(TargetConfig(model=smollm_dir, dtype="float32"))


@pytest.fixture(scope="module")
def tiny_llama(smollm_dir: Path, tmp_path_factory) -> HFTarget:
    out = tmp_path_factory.mktemp("tiny") / "llama"
    return HFTarget(TargetConfig(model=build_tiny_causal_lm("llama", out, tokenizer_dir=smollm_dir), dtype="float32"))


def conversations(n: int) -> list[Conversation]:
    """Rows of clearly different lengths, some multi-turn, so a batch really pads."""
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Question {i}: " + "why is that so? " * (i % 3 + 1)},
                    {"role": "assistant", "content": f"Answer {i}. " + "Because it is. " * (2 * i + 1)}]
        if i % 2:
            messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then more."}]
        rows.append(Conversation(messages=messages, source_index=i, temperature=0.7, finish_reason="stop"))
    return rows


def rendered(target: HFTarget, n: int):
    return [r.row for r in Renderer(target.frontend, RenderConfig())(conversations(n))]


def max_diffs(a, b) -> dict[str, float]:
    """Largest absolute difference, and largest per-token relative one (||x - y|| / ||y|| over the
    hidden dimension: scale-aware, since a few "massive" channels reach ~2.5e4 while most are < 1)."""

    def rel(x, y):
        x, y = x.float(), y.float()
        return ((x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-6)).max().item()

    return {
        "aux_abs": max((x[0].float() - y[0].float()).abs().max().item() for x, y in zip(a, b)),
        "last_abs": max((x[1].float() - y[1].float()).abs().max().item() for x, y in zip(a, b)),
        "aux_rel": max(rel(x[0], y[0]) for x, y in zip(a, b)),
        "last_rel": max(rel(x[1], y[1]) for x, y in zip(a, b)),
    }


def test_target_reports_sizes_default_layers_and_fingerprints(smollm32, smollm_dir):
    t = smollm32
    assert (t.hidden_size, t.num_layers, t.vocab_size) == (576, 30, 49152)
    assert t.spec.family == "llama" and t.default_aux_layer_ids == (2, 15, 27)
    header = t.header()
    assert header.aux_layer_ids == (2, 15, 27) and header.dtype == "bfloat16"
    assert header.aux_layer_convention == "residual_entering_layer" and header.last_hidden_state == "pre_norm"
    info = header.target
    assert info.name == "SmolLM2-135M-Instruct" and (info.vocab_size, info.num_hidden_layers) == (49152, 30)
    assert info.config_sha256 == hashlib.sha256((smollm_dir / "config.json").read_bytes()).hexdigest()
    assert info.chat_template_sha256 == hashlib.sha256(t.frontend.tokenizer.chat_template.encode()).hexdigest()
    assert len(info.tokenizer_sha256) == 64 and info.tokenizer_sha256 != info.config_sha256


def test_aux_states_are_the_residual_entering_each_layer_and_last_is_pre_norm(smollm32):
    """id i = HF output_hidden_states[i]; the last state is the final norm's input, and
    lm_head(norm(last)) gives the model's real logits."""
    row = rendered(smollm32, 1)[0]
    stage = CaptureStage(smollm32, CaptureConfig())
    [(aux, last, positions)] = stage.hidden_states([row])
    assert positions is None and aux.shape == (row.num_tokens, 3, 576) and last.shape == (row.num_tokens, 576)
    with torch.inference_mode():
        out = smollm32.model(row.input_ids[None], output_hidden_states=True)
    hf = out.hidden_states
    for k, i in enumerate((2, 15, 27)):
        torch.testing.assert_close(aux[:, k], hf[i][0], rtol=1e-5, atol=1e-5)
    # HF's hidden_states[L] is after the final norm; ours is before it.
    assert (last - hf[30][0]).abs().max() > 1.0
    torch.testing.assert_close(smollm32.norm(last), hf[30][0], rtol=1e-5, atol=1e-5)
    logits_diff = (smollm32.logits(last) - out.logits[0]).abs().max().item()
    log.info("lm_head(norm(last)) vs logits, float32: max abs diff %.3g", logits_diff)
    assert logits_diff < 1e-4


def test_batched_capture_equals_one_row_at_a_time_in_float32(smollm32):
    rows = rendered(smollm32, 4)
    assert len({r.num_tokens for r in rows}) == 4  # every batch row but the longest is padded
    batched = CaptureStage(smollm32, CaptureConfig(max_batch_size=4)).hidden_states(rows)
    single = CaptureStage(smollm32, CaptureConfig(max_batch_size=1)).hidden_states(rows)
    diffs = max_diffs(batched, single)
    log.info("batched vs single, float32: %s", diffs)
    # float32 eps is 1.2e-7; 30 layers of differently blocked matmuls stay within a few 1e-6.
    assert diffs["aux_rel"] < 1e-5 and diffs["last_rel"] < 1e-5, diffs


def test_batched_capture_equals_one_row_at_a_time_in_bfloat16(smollm_dir, smollm32):
    """bf16 tolerance, measured rather than guessed: batching may move a bf16 capture no further
    than bf16 itself sits from the float32 capture of the same rows."""
    target = HFTarget(TargetConfig(model=smollm_dir, dtype="bfloat16"))
    rows = rendered(target, 3)
    batched = CaptureStage(target, CaptureConfig(max_batch_size=3)).hidden_states(rows)
    single = CaptureStage(target, CaptureConfig(max_batch_size=1)).hidden_states(rows)
    exact = CaptureStage(smollm32, CaptureConfig(max_batch_size=1)).hidden_states(rows)
    assert all(a.dtype == torch.bfloat16 for a, _, _ in batched)
    diffs, bf16_error = max_diffs(batched, single), max_diffs(single, exact)
    log.info("batched vs single, bfloat16: %s; single bfloat16 vs float32: %s", diffs, bf16_error)
    # bf16 eps is 7.8e-3; over 30 layers a single bf16 capture sits a few percent from float32.
    tolerance = 1.5 * max(bf16_error["aux_rel"], bf16_error["last_rel"])
    assert tolerance < 0.15, bf16_error
    assert diffs["aux_rel"] < tolerance and diffs["last_rel"] < tolerance, (diffs, tolerance)
    towards_exact = max_diffs(batched, exact)
    assert towards_exact["aux_rel"] < tolerance and towards_exact["last_rel"] < tolerance, towards_exact


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_samples_round_trip_through_a_shard_writer(smollm32, tmp_path, dtype, torch_dtype):
    rows = rendered(smollm32, 2)
    stage = CaptureStage(smollm32, CaptureConfig(storage_dtype=dtype, aux_layer_ids=(1, 10, 30)))
    samples = stage(rows)
    assert [s.source_index for s in samples] == [0, 1]
    with ShardWriter(tmp_path, stage.header) as writer:
        for s in samples:
            writer.add(s)
    writer.close()
    ds = Dataset(tmp_path)
    assert ds.header.aux_layer_ids == (1, 10, 30) and ds.header.dtype == dtype
    for s, got in zip(samples, ds):
        assert s.aux_hidden_states.dtype == torch_dtype
        assert torch.equal(got["aux_hidden_states"], s.aux_hidden_states)
        assert torch.equal(got["last_hidden_state"], s.last_hidden_state)
        assert got["input_ids"].tolist() == s.input_ids.tolist() and got["loss_mask"].tolist() == s.loss_mask.tolist()
        assert got["temperature"] == pytest.approx(0.7) and got["finish_reason"] == "stop"
        # id L (30) is the final norm's input: the same tensor as the last hidden state.
        assert torch.equal(s.aux_hidden_states[:, 2], s.last_hidden_state)


@pytest.mark.parametrize("ids", [(0, 5, 31), (1, 2), (-1, 2, 3)])
def test_bad_aux_layer_ids_are_refused_naming_the_range(smollm32, ids):
    with pytest.raises(ValueError, match=r"aux_layer_ids"):
        CaptureStage(smollm32, CaptureConfig(aux_layer_ids=ids))


def test_length_buckets_respect_the_token_budget_and_keep_every_row_once():
    lengths = [5, 90, 30, 31, 200, 7, 64, 64, 1]
    batches = length_buckets(lengths, max_batch_tokens=128, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128)
        assert lengths[b[0]] == max(lengths[i] for i in b)
    assert [4] in batches  # longer than the budget: alone


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(TargetError, match="no target spec serves model_type 'bert'.*llama"):
        spec_for("bert")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"])
def test_each_family_spec_captures_what_transformers_computes(model_type, smollm_dir, tmp_path):
    """Tiny random models of each family: the hooks see HF's hidden states, the last state gives
    the logits (with Gemma's soft-capping), and batching changes nothing."""
    target = HFTarget(TargetConfig(model=build_tiny_causal_lm(model_type, tmp_path / model_type,
                                                                tokenizer_dir=smollm_dir), dtype="float32"))
    assert target.spec.model_types.count(model_type) == 1 and target.default_aux_layer_ids == (2, 4, 5)
    rows = rendered(target, 4)
    batched = CaptureStage(target, CaptureConfig()).hidden_states(rows)
    single = CaptureStage(target, CaptureConfig(max_batch_size=1)).hidden_states(rows)
    for (a, l, _), (a1, l1, _) in zip(batched, single):
        torch.testing.assert_close(a, a1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l, l1, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        out = target.model(rows[0].input_ids[None], output_hidden_states=True)
    aux, last, _ = batched[0]
    torch.testing.assert_close(aux, torch.stack([out.hidden_states[i][0] for i in (2, 4, 5)], dim=1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.logits(last), out.logits[0], rtol=1e-5, atol=1e-5)


def poisoned(row, vocab_size: int):
    """The row with a token id the embedding has no row for: the forward pass raises IndexError."""
    ids = row.input_ids.clone()
    ids[1] = vocab_size
    return dataclasses.replace(row, sample_id=row.sample_id + "-poisoned", input_ids=ids)


def test_a_row_that_makes_the_forward_raise_fails_alone_and_its_batch_is_captured(tiny_llama):
    good = rendered(tiny_llama, 3)
    bad = poisoned(good[1], tiny_llama.vocab_size)
    stage = CaptureStage(tiny_llama, CaptureConfig(max_batch_size=4))
    out = stage([good[0], bad, good[2]])
    assert [type(x) for x in out] == [Sample, RowFailure, Sample]
    assert out[1].sample_id == bad.sample_id and out[1].stage == "capture"
    assert out[1].reason.startswith("the capture stage raised IndexError: index out of range")
    expected = CaptureStage(tiny_llama, CaptureConfig(max_batch_size=1)).hidden_states([good[0], good[2]])
    for sample, (aux, _, _) in zip((out[0], out[2]), expected):
        torch.testing.assert_close(sample.aux_hidden_states, aux.to(torch.bfloat16))
    # Alone in its batch, after other rows went through: still the row's failure.
    [alone] = stage([bad])
    assert isinstance(alone, RowFailure) and alone.sample_id == bad.sample_id


def test_when_no_row_goes_through_the_target_the_error_stops_the_job(tiny_llama):
    """Nothing shows the target works (a fresh stage, every row fails): the error is not taken
    for the rows', which would quarantine them one after another."""
    rows = [poisoned(r, tiny_llama.vocab_size) for r in rendered(tiny_llama, 2)]
    with pytest.raises(IndexError):
        CaptureStage(tiny_llama, CaptureConfig())(rows)
    # A target that breaks after rows went through: the last good row, run again, fails too.
    broken = HFTarget(TargetConfig(model=tiny_llama.config.model, dtype="float32"))
    stage = CaptureStage(broken, CaptureConfig())
    good = rendered(broken, 3)
    assert isinstance(stage(good[:1])[0], Sample)
    embed = broken.model.model.embed_tokens
    embed.weight.data = embed.weight.data[:(embed.padding_idx or 0) + 1]  # the other tokens lose their embedding
    with pytest.raises(IndexError):
        stage(good[1:])


def test_a_target_loaded_with_auto_computes_in_the_dtype_this_machine_does_natively(smollm_dir):
    target = HFTarget(TargetConfig(model=smollm_dir))
    assert str(target.dtype) == f"torch.{resolve_model_dtype('auto', 'cpu')}"
    assert next(target.model.parameters()).dtype == target.dtype
