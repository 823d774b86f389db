"""Run `speculators.train` (speculators 0.9.0) on a CPU: `python speculators_cpu.py ARGS...`
takes the same ARGS as `python -m speculators.train`. Pass `--draft-attn-impl sdpa` and
`--loss-implementation eager` (the defaults are a flex-attention mask and a Triton loss).

Shims, each for one GPU assumption met on a 2-core CPU machine:
  S1 device: the Trainer moves the model and every batch with `.to(local_rank)`, an int,
     which torch reads as accelerator 0 ("Cannot access accelerator device when none is
     available"). The trainer module's `get_local_rank` returns the CPU device instead.
  S2 autocast: with no accelerator the Trainer picks autocast device "cuda"; it gets "cpu"
     (autocast at its --hidden-states-dtype: bench peers passes float32 on a CPU without
     native bf16, where CPU autocast to float32 is a no-op, as specmill computes there).
  S3 synchronisation: the step timer calls `torch.accelerator.synchronize()`, which raises
     without an accelerator; with none there is nothing to wait for, so it is a no-op.
  S4 Muon precision: torch's Muon orthogonalises each update with a Newton-Schulz iteration
     run in bf16 (fast on GPU tensor cores). On a CPU without native bf16 - where bench peers
     passes `--hidden-states-dtype float32` - a bf16 matmul takes torch's slow reference path:
     measured, 77% of a 2,048-token step here. With float32 hidden states the same iteration
     (same coefficients and steps) runs in float32.
"""

import sys

import torch


def _patch() -> None:
    from speculators.train import trainer

    if torch.accelerator.current_accelerator() is not None:
        return  # a real accelerator: run unpatched
    cpu = torch.device("cpu")
    trainer.get_local_rank = lambda: cpu  # S1
    init = trainer.Trainer.__init__

    def init_on_cpu(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.device_type = "cpu"  # S2

    trainer.Trainer.__init__ = init_on_cpu
    torch.accelerator.synchronize = lambda *a, **k: None  # S3
    if "--hidden-states-dtype" in sys.argv and sys.argv[sys.argv.index("--hidden-states-dtype") + 1] == "float32":
        from torch.optim import _muon

        _muon._zeropower_via_newtonschulz = newton_schulz_fp32  # S4


def newton_schulz_fp32(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                       eps: float) -> torch.Tensor:
    """S4: Muon's orthogonalisation, X <- a X + (b G + c G^2) X with G = X X^T after scaling X
    to spectral norm <= 1 (by its Frobenius norm), on the wide orientation, in float32."""
    a, b, c = coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


if __name__ == "__main__":
    _patch()
    from speculators.train.cli import main
    from speculators.train.config import TrainConfig

    main(TrainConfig.resolve(sys.argv[1:]))
