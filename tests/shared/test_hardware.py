"""What `auto` means for a forward pass's dtype: bfloat16 only where the hardware does it natively."""

from __future__ import annotations

import pytest
import torch

from shared.hardware import bf16_is_native, resolve_model_dtype, with_vllm_dtype
from trainer.config import resolve_precision


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(False, False, "float32"), (True, False, "bfloat16"),
                                                      (False, True, "bfloat16")])
def test_auto_on_a_cpu_is_bfloat16_only_with_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert resolve_model_dtype("auto", "cpu") == expected
    assert resolve_precision("auto", "cpu") == {"float32": "fp32", "bfloat16": "bf16"}[expected]


def test_auto_on_a_gpu_is_bfloat16_and_an_explicit_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_model_dtype("auto", "cuda:1") == "bfloat16" and bf16_is_native("cuda")
    assert resolve_model_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_model_dtype("float16", "cuda") == "float16"
    assert not bf16_is_native("mps")



def test_vllm_gets_this_machines_dtype_unless_the_user_gave_one(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert with_vllm_dtype(("--enforce-eager",)) == ["--enforce-eager", "--dtype", "float32"]
    assert with_vllm_dtype(["--dtype=bfloat16"]) == ["--dtype=bfloat16"]
    assert with_vllm_dtype(["--dtype", "float16", "--enforce-eager"]) == ["--dtype", "float16", "--enforce-eager"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert with_vllm_dtype(()) == ["--dtype", "bfloat16"]
