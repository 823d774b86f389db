"""Hidden-state capture: rendered rows -> `shared.shards.Sample`s, many rows per forward pass.

Rows are grouped by length (longest first) into batches of at most `max_batch_tokens`
padded tokens and right-padded. Right padding keeps the capture exact: under a causal
mask a real token only ever attends to positions at or before it, which are all real, so
the pad tokens change nothing a kept position sees, and every row keeps positions
0..T-1 (or its own mRoPE positions). The attention mask is passed anyway so pad rows are
well-defined. Text, image and audio rows of one multimodal target share a forward pass:
media tensors are concatenated in row order, which is the order the model fills the
placeholders in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.manifest import DTYPES, DatasetHeader
from shared.shards import Sample

from factory.render import RenderedRow
from factory.rows import RowFailure, is_row_failure, row_reason
from factory.targets import HFTarget, Target, TargetConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("specmill.factory.capture")

# One row's capture: aux [T, 3, H], pre-norm last [T, H], mRoPE position ids [3, T] or None.
Captured = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]


def check_storage_fields(dtype: str, aux_layer_ids) -> tuple[int, int, int] | None:
    """Validate the two settings every capture backend shares; returns the ids as a tuple."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if aux_layer_ids is None:
        return None
    ids = tuple(int(i) for i in aux_layer_ids)
    if len(ids) != 3:
        raise ValueError(f"aux_layer_ids must name 3 layers, got {ids}")
    return ids


@dataclass(kw_only=True, slots=True)
class CaptureConfig:
    aux_layer_ids: tuple[int, int, int] | None = None  # None: the target's default (manifest.default_aux_layer_ids)
    storage_dtype: str = "bfloat16"  # how hidden states are stored (the forward runs in the target's dtype)
    max_batch_tokens: int = 8192  # rows x longest row, per forward pass
    max_batch_size: int = 32

    def __post_init__(self) -> None:
        self.aux_layer_ids = check_storage_fields(self.storage_dtype, self.aux_layer_ids)
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError(f"max_batch_tokens and max_batch_size must be positive, got "
                             f"{self.max_batch_tokens} and {self.max_batch_size}")


class CaptureStage:
    """Pipeline stage: `__call__(rendered rows) -> samples`, in the rows' order (a row that
    makes the forward pass raise comes back as its `RowFailure`)."""

    def __init__(self, target: Target | TargetConfig, config: CaptureConfig):
        import torch

        self.target = HFTarget.load(target) if isinstance(target, TargetConfig) else target
        self.config = config
        self.header: DatasetHeader = self.target.header(aux_layer_ids=config.aux_layer_ids, dtype=config.storage_dtype)
        self.layer_ids = self.header.aux_layer_ids
        self._dtype = getattr(torch, config.storage_dtype)
        self._known_good: RenderedRow | None = None  # a row that went through: proof the target works

    def __call__(self, rows: Sequence[RenderedRow]) -> list[Sample | RowFailure]:
        """A sample per row, or the row's failure (see `_forward_rows`)."""
        import torch

        out: list[Sample | RowFailure] = []
        for row, captured in zip(rows, self._batched(rows, self._forward_rows)):
            if isinstance(captured, RowFailure):
                out.append(captured)
                continue
            aux, last, positions = captured
            out.append(Sample(
                sample_id=row.sample_id,
                source_index=row.source_index,
                input_ids=row.input_ids,
                loss_mask=row.loss_mask,
                aux_hidden_states=aux.to(self._dtype),
                last_hidden_state=last.to(self._dtype),
                position_ids=positions.to(torch.int32) if positions is not None else None,
                modality_spans=list(row.modality_spans),
                temperature=row.temperature,
                finish_reason=row.finish_reason,
            ))
        return out

    def hidden_states(self, rows: Sequence[RenderedRow]) -> list[Captured]:
        """Per row, in the rows' order and the model's dtype, before the storage cast:
        aux [T, 3, H], pre-norm last [T, H], mRoPE position ids [3, T] or None."""
        return self._batched(rows, self._forward)

    def _batched(self, rows: Sequence[RenderedRow], forward) -> list:
        out: list = [None] * len(rows)
        batches = length_buckets([r.num_tokens for r in rows], max_batch_tokens=self.config.max_batch_tokens,
                                 max_batch_size=self.config.max_batch_size)
        for batch in batches:
            for i, captured in zip(batch, forward([rows[i] for i in batch])):
                out[i] = captured
        return out

    def _forward_rows(self, rows: list[RenderedRow]) -> list[Captured | RowFailure]:
        """`_forward`, with the row boundary (factory.rows) drawn around each row: a batch that
        raises runs again row by row, and a row that raises alone is that row's failure, as long
        as the target shows it works (another row of the batch goes through, or the last row
        that went through goes through again). If nothing does, the target is broken: the error
        stops the job instead of quarantining row after row."""
        try:
            captured = self._forward(rows)
        except Exception as e:
            if not is_row_failure(e):
                raise
            return self._row_by_row(rows, e)
        self._known_good = min(rows, key=lambda r: r.num_tokens)
        return captured

    def _row_by_row(self, rows: list[RenderedRow], error: Exception) -> list[Captured | RowFailure]:
        log.warning("a capture batch of %d rows raised %s; running its rows one by one", len(rows),
                    type(error).__name__)
        alone = [self._forward_alone(row) for row in rows]
        if all(isinstance(a, Exception) for a in alone) and not self._target_works():
            raise error
        out: list[Captured | RowFailure] = []
        for row, a in zip(rows, alone):
            if isinstance(a, Exception):
                log.warning("row %s (source_index %d) fails capture alone: %s", row.sample_id, row.source_index, a)
                out.append(RowFailure(sample_id=row.sample_id, stage="capture", reason=row_reason(a, "capture")))
            else:
                self._known_good = row
                out.append(a)
        return out

    def _forward_alone(self, row: RenderedRow) -> Captured | Exception:
        try:
            return self._forward([row])[0]
        except Exception as e:  # judged by the caller, which sees the whole batch
            if not is_row_failure(e):
                raise
            return e

    def _target_works(self) -> bool:
        """Whether the last row that went through goes through again (False if none has yet)."""
        return self._known_good is not None and not isinstance(self._forward_alone(self._known_good), Exception)

    def _forward(self, rows: list[RenderedRow]) -> list[Captured]:
        import torch

        lengths = [r.num_tokens for r in rows]
        b, t = len(rows), max(lengths)
        input_ids = torch.full((b, t), self.target.frontend.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        row_positions = [self.target.position_ids(r.input_ids, r.media, r.modality_spans) for r in rows]
        mrope = row_positions[0] is not None
        # input_ids: [B, T]; position_ids: [B, T], or [3, B, T] for mRoPE (pads stay at 0).
        position_ids = torch.zeros((3, b, t) if mrope else (b, t), dtype=torch.long)
        for k, (row, n) in enumerate(zip(rows, lengths)):
            input_ids[k, :n] = row.input_ids
            attention_mask[k, :n] = 1
            if mrope:
                position_ids[:, k, :n] = row_positions[k]
            else:
                position_ids[k, :n] = torch.arange(n)
        # aux: [B, T, 3, H], last: [B, T, H]
        aux, last = self.target.forward_capture(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, media=_collate_media(rows),
                                                layer_ids=self.layer_ids)
        log.debug("captured %d rows x %d tokens (%d real)", b, t, sum(lengths))
        # copy=True: each row owns its bytes instead of pinning the whole batch tensor
        return [(aux[k, :n].to("cpu", copy=True), last[k, :n].to("cpu", copy=True), row_positions[k])
                for k, n in enumerate(lengths)]


def _collate_media(rows: Sequence[RenderedRow]) -> dict:
    import torch

    items = [m for r in rows for m in r.media]
    keys = {k for m in items for k in m.tensors}
    return {k: torch.cat([m.tensors[k] for m in items if k in m.tensors]) for k in sorted(keys)}


def length_buckets(lengths: Sequence[int], *, max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first so that rows x longest row <= max_batch_tokens
    (a row longer than that goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_batch_size \
                and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
