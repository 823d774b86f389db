"""Run `specforge train` (specforge 0.2.0) on a CPU: `python specforge_cpu.py ARGS...` takes
the same ARGS as `specforge` (e.g. `train --config run.yaml`). The run config should say
`training.attention_backend: sdpa` (the default is flex attention) and
`training.fsdp_sharding: NO_SHARD`.

Shims, each for one GPU assumption met on a 2-core CPU machine:
  F1 compilation: `TORCHDYNAMO_DISABLE=1` before torch is imported (torch.compile on a CPU
     would need a C++ toolchain per shape and gains nothing here).
  F2 loss kernel: the EAGLE-3 KL loss is a Triton kernel ("0 active drivers" without a GPU).
     It is replaced by the same quantity written in torch, left to autograd: per position
     -sum_v p(v) log softmax(z)(v) in fp32, zero where the position mask is 0, averaged over
     all B*T positions (the kernel's reduction; its hand-written backward is this formula's
     gradient).
  F3 target head precision: SpecForge casts its frozen target head (the target's lm_head,
     which gives the target distribution the loss matches) to bf16 whatever the run's
     `model.torch_dtype`. On a CPU without native bf16 - where bench peers sets
     `model.torch_dtype: float32` - that one bf16 matmul per sample takes torch's slow reference
     path, and its bf16 output meets float32 states; the head is kept in the run's dtype.
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # F1

import torch  # noqa: E402


class TorchSoftCrossEntropy(torch.autograd.Function):
    """F2: the loss as plain torch ops (forward and backward by autograd)."""

    @staticmethod
    def apply(logits: torch.Tensor, target: torch.Tensor, position_mask: torch.Tensor) -> torch.Tensor:
        # logits, target: [B, T, V]; position_mask: [B, T, 1]
        per_position = -(target.float() * torch.log_softmax(logits.float(), dim=-1)).sum(-1, keepdim=True)
        return (per_position * position_mask.to(per_position.dtype)).mean()


def _patch() -> None:
    if torch.cuda.is_available():
        return  # a real GPU: run unpatched
    import importlib

    for name in ("specforge.algorithms.eagle3.model", "specforge.core.loss"):
        module = importlib.import_module(name)
        if hasattr(module, "LogSoftmaxLoss"):
            module.LogSoftmaxLoss = TorchSoftCrossEntropy  # F2
    dtype = _run_dtype()
    if dtype is not None and dtype != torch.bfloat16:
        from specforge.modeling.target.target_head import TargetHead

        loaded = TargetHead.from_pretrained.__func__

        def in_run_dtype(cls, *args, **kwargs):
            return loaded(cls, *args, **kwargs).to(dtype)  # F3

        TargetHead.from_pretrained = classmethod(in_run_dtype)


def _run_dtype() -> torch.dtype | None:
    """`model.torch_dtype` of the run config given as `train --config FILE` (JSON), if any."""
    import json

    if "--config" not in sys.argv:
        return None
    config = json.loads(open(sys.argv[sys.argv.index("--config") + 1]).read())
    name = (config.get("model") or {}).get("torch_dtype")
    return getattr(torch, name) if name else None


if __name__ == "__main__":
    _patch()
    from specforge.cli import main

    sys.exit(main(sys.argv[1:]))
