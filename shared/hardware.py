"""What the local hardware computes fast: the one place that decides what `auto` means for a
forward pass's dtype (the factory's capture, the trainer's precision)."""

from __future__ import annotations


def bf16_is_native(device_type: str) -> bool:
    """Whether bfloat16 matmuls run natively on `device_type` ("cuda", "cpu", ...).

    On a CPU without AMX or AVX512-BF16, torch emulates them: a SmolLM2-135M forward ran 7x
    slower in bfloat16 than in float32 on a 2-core AMD EPYC (measured, one thread each)."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and probe() for probe in probes)


def resolve_model_dtype(dtype: str, device: str) -> str:
    """A torch dtype name for a forward pass: `dtype` itself, or for "auto" bfloat16 where it is
    native on `device` ("cpu", "cuda", "cuda:1") and float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_is_native(device.split(":")[0]) else "float32"


def local_device() -> str:
    """"cuda" where this process sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def with_vllm_dtype(args: tuple[str, ...] | list[str]) -> list[str]:
    """vLLM arguments with `--dtype` added for this machine unless given: vLLM's own default is
    the model's dtype (bfloat16 for most), which on a CPU without native bfloat16 generated
    1.5x (one request) to 3.6x (16 at once) slower than float32 (SmolLM2-135M, 2-core EPYC)."""
    args = list(args)
    if any(a == "--dtype" or a.startswith("--dtype=") for a in args):
        return args
    return [*args, "--dtype", resolve_model_dtype("auto", local_device())]
