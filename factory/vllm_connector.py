"""vLLM's hidden-states KV connector, made to work on CPU as well as on GPU.

vLLM's `extract_hidden_states` speculative method writes, per prompt token, the residual
streams of the requested layers into a KV-cache group; `ExampleHiddenStatesConnector`
copies them out of that cache when the request finishes and saves them to a safetensors
file (`hidden_states [T, n_ids, H]`, `token_ids [T]`). The stock connector copies through
a CUDA stream into pinned host memory, so on the CPU build the engine dies on the first
request (`pin_memory=True requires a CUDA or other accelerator backend`).

`SpecmillHiddenStatesConnector` keeps the stock path whenever the cache lives on a CUDA
device. Otherwise the copy is synchronous: the gather out of the (host) cache already makes
a fresh tensor (whole blocks, then one transposing copy), so the request's blocks can be
freed at once; only the file write goes to
the writer threads, and the per-file lock (held exclusively until the write ends) is what
a reader waits on, exactly as with the stock connector.

The vLLM server imports this module by name (`kv_connector_module_path`); nothing else in
specmill imports it, so `vllm` is imported at the top.
"""

from __future__ import annotations

import fcntl
import os
from functools import partial

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
)

CONNECTOR_NAME = "SpecmillHiddenStatesConnector"


class _CopyDone:
    """Stands in for the CUDA event the stock connector polls: a host copy is done when made."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def gather_hidden_states(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """A request's hidden states out of the cache, as a new tensor [num_tokens, n_ids, H].

    kv_cache: [num_blocks, n_ids, block_size, H]; token t of the request sits in block
    block_ids[t // block_size] at offset t % block_size. The same tensor as the stock
    `extract_from_kv_cache` gathers slot by slot, about twice as fast on CPU: whole blocks,
    then one transposing copy."""
    blocks = kv_cache.index_select(0, torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device))
    # blocks: [nb, n_ids, block_size, H] -> [nb * block_size, n_ids, H], token order
    return blocks.transpose(1, 2).reshape(-1, kv_cache.shape[1], kv_cache.shape[3])[:num_tokens]


class SpecmillHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        if self._kv_cache.is_cuda:
            super()._submit_async_write(pending)
            return
        hidden_states = gather_hidden_states(self._kv_cache, pending.block_ids, int(pending.token_ids.shape[0]))
        tensors = {"hidden_states": hidden_states.contiguous(), "token_ids": pending.token_ids.clone()}
        if pending.req_id in self._req_futures:
            raise RuntimeError(f"hidden states of request {pending.req_id} are already being written")
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:  # wait_for_save normally created it already
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        done = _CopyDone()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))
