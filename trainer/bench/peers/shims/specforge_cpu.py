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


if __name__ == "__main__":
    _patch()
    from specforge.cli import main

    sys.exit(main(sys.argv[1:]))
