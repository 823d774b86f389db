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


if __name__ == "__main__":
    _patch()
    from speculators.train.cli import main
    from speculators.train.config import TrainConfig

    main(TrainConfig.resolve(sys.argv[1:]))
