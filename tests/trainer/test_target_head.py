"""Target logits recomputed from stored last hidden states equal the target's own."""

import pytest
import torch

from trainer.target import TargetArch, TargetHead, load_target_weights, target_fingerprint
from trainer_fixtures import capture, tiny_llama_config


@pytest.fixture(scope="module")
def hf_model(tiny_target):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_target).eval()


@pytest.mark.parametrize("stored", ["pre_norm", "post_norm"])
def test_logits_from_the_last_hidden_state_equal_the_targets_forward(tiny_target, hf_model, stored):
    arch = TargetArch.from_config_json(tiny_target)
    head = TargetHead(load_target_weights(tiny_target, arch), eps=arch.rms_norm_eps, pre_norm=stored == "pre_norm")
    ids = torch.randint(0, arch.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    _, pre_norm, logits = capture(hf_model, ids)
    with torch.no_grad():
        last = pre_norm if stored == "pre_norm" else hf_model(ids, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(head(last), logits, atol=1e-5, rtol=1e-5)


def test_target_arch_reads_the_config_json(tiny_target):
    arch = TargetArch.from_config_json(tiny_target)
    assert (arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (64, 4, 2, 16)
    assert (arch.vocab_size, arch.num_hidden_layers, arch.rope_theta, arch.rope_scaling) == (512, 4, 10000.0, None)


def test_fingerprint_changes_with_the_weights_layout(tiny_target, tmp_path):
    from transformers import LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(tiny_llama_config(intermediate_size=96)).save_pretrained(other)
    assert target_fingerprint(tiny_target) == target_fingerprint(tiny_target)
    assert target_fingerprint(tiny_target) != target_fingerprint(other)
