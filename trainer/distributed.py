"""Data parallelism across processes started by torchrun (one per GPU, or a few on CPU).

Each rank reads its own share of every step's micro-batches (trainer/data.py). Two strategies
(`distributed.strategy`):
- ddp: every rank holds the whole draft (it is one layer) and gradients are averaged with
  one flat all-reduce per step; there is no DDP wrapper because the TTT unroll calls the
  draft's parts, not its forward().
- fsdp: torch FSDP2 `fully_shard` on each part the unroll calls (input_norm if any, fc,
  midlayer, norm, lm_head), so each part's forward hook gathers its parameters and its backward
  reduce-scatters the gradient mean; parameters, gradients and AdamW state live sharded.
  The root is not sharded: its forward() is never called. Checkpoints hold the full
  (unsharded) state, gathered to rank 0, so export reads them like ddp's.
Rank 0 logs, writes metrics and checkpoints. Nothing in a checkpoint depends on the rank
count: the weights and the optimizer state are whole tensors keyed by parameter name, and
the data position is the global stream's (the same on every rank). So a run resumes on
another rank count, ddp or fsdp, as long as the global batch (ranks x data.micro_batches)
stays the same (checkpoint.check_compatible).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("specmill.trainer")


@dataclass(kw_only=True, slots=True)
class World:
    rank: int = 0
    size: int = 1
    owns_group: bool = False  # init_world started the process group (so close() ends it)
    sharded: bool = False  # the draft is FSDP-sharded (shard_draft): gradients arrive averaged

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """grad <- mean over ranks, as one flat all-reduce (a missing grad counts as zeros,
        so every rank reduces the same layout). A no-op when sharded: FSDP's backward has
        already reduce-scattered the mean."""
        if self.size == 1 or self.sharded:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one (all ranks stop at the same step)."""
        return bool(self.sum(torch.tensor([int(flag)], device=self.device)).item()) if self.size > 1 else flag

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """End the process group if init_world started it, all ranks together (a rank that
        tears gloo down while another still talks to it can abort the process)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(device: str) -> tuple[World, torch.device]:
    """The process group (if torchrun started several processes) and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is visible; use device = 'cpu' or 'auto'")
    if size == 1:
        return World(), torch.device("cuda" if use_cuda else "cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), owns_group=owns)
    if not world.is_main:
        logging.getLogger("specmill").setLevel(logging.WARNING)
    return world, torch.device("cuda", local) if use_cuda else torch.device("cpu")


# --------------------------------------------------------------------------- fsdp

# The draft's parts that the TTT unroll calls (so their forward hooks gather the parameters);
# input_norm exists only with draft.norm_before_fc.
SHARDED_PARTS = ("input_norm", "fc", "midlayer", "norm", "lm_head")


def shard_draft(model: torch.nn.Module, world: World) -> None:
    """FSDP2 `fully_shard` on each part in SHARDED_PARTS the draft has (in place, before the
    optimizer is built)."""
    from torch.distributed.fsdp import fully_shard

    parts = [part for part in SHARDED_PARTS if getattr(model, part, None) is not None]
    covered = {f"{part}.{name}" for part in parts for name, _ in getattr(model, part).named_parameters()}
    missing = {name for name, _ in model.named_parameters()} - covered
    if missing:  # a parameter outside every part would stay unsharded and un-averaged
        raise RuntimeError(f"parameters {sorted(missing)} are in no FSDP part {SHARDED_PARTS}")
    for part in parts:
        fully_shard(getattr(model, part))
    world.sharded = True


class ShardedModelState:
    """The sharded draft's state as full tensors (gathered to rank 0 on save; every rank
    takes its shard on load): the same layout as an unsharded draft's state_dict()."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class OptimizerState:
    """The optimizer's state as full tensors keyed by parameter name, sharded draft or not
    (gathered to rank 0 on save, a collective; every rank takes its shard on load): one
    layout whatever the rank count and strategy, so a run resumes on another rank count.
    Checkpoints written before it hold torch's own layout (keyed by parameter index);
    those are read too."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if any(isinstance(i, int) for group in state["param_groups"] for i in group["params"]):
            state = self._by_name(state)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def _by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        """torch's layout -> by name: index i is the i-th parameter of the param groups in order."""
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        names = [name_of[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        return {"state": {names[i]: value for i, value in state["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}
