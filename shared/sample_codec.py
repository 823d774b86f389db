"""A shard's bytes read without pyarrow: where each record batch lies (the Arrow IPC
footer), what a record batch message holds (its field nodes and buffers), and a specmill
sample decoded straight from them.

`Dataset[i]` and the stream's reads both end here (shared.shards, shared.stream); this
module depends on neither. The field table must match `shards.shard_schema` (checked when
shared.shards is imported).
"""

from __future__ import annotations

import json
import math
import operator
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

_ARROW_MAGIC = b"ARROW1"


class ShardError(RuntimeError):
    """A shard that is missing, truncated, corrupt or does not match its manifest."""


@dataclass(frozen=True, slots=True)
class Block:
    """Where one record batch lies in an Arrow IPC file: its message metadata, then its body."""

    offset: int
    metadata_length: int
    body_length: int

    @property
    def end(self) -> int:
        return self.offset + self.metadata_length + self.body_length


class FooterError(ValueError):
    pass


def record_batch_blocks(tail: memoryview | bytes) -> list[Block]:
    """The record-batch blocks listed in an Arrow IPC file's footer.

    `tail` is the file (or its end, as long as it holds the whole footer). pyarrow does not
    expose block offsets; the footer is a flatbuffer `Footer { version, schema,
    dictionaries, recordBatches: [Block] }` followed by its int32 length and "ARROW1", and
    `Block` is a 24-byte struct { offset: int64, metaDataLength: int32, pad, bodyLength: int64 }.
    """
    if len(tail) < 10 or bytes(tail[-6:]) != _ARROW_MAGIC:
        raise FooterError("no Arrow IPC file footer (file truncated?)")
    (footer_length,) = struct.unpack_from("<i", tail, len(tail) - 10)
    start = len(tail) - 10 - footer_length
    if footer_length <= 0 or start < 0:
        raise FooterError(f"footer length {footer_length} does not fit the file")
    footer = memoryview(tail)[start:len(tail) - 10]
    try:
        (table,) = struct.unpack_from("<I", footer, 0)
        (vtable_back,) = struct.unpack_from("<i", footer, table)
        vtable = table - vtable_back
        (vtable_length,) = struct.unpack_from("<H", footer, vtable)
        slot = 4 + 2 * 3  # field 3: recordBatches
        field = struct.unpack_from("<H", footer, vtable + slot)[0] if slot < vtable_length else 0
        if field == 0:
            return []
        vector = table + field + struct.unpack_from("<I", footer, table + field)[0]
        (count,) = struct.unpack_from("<I", footer, vector)
        return [Block(*struct.unpack_from("<qi4xq", footer, vector + 4 + 24 * i)) for i in range(count)]
    except struct.error as e:
        raise FooterError(f"footer is malformed ({e})") from None


class BatchLayout(NamedTuple):
    """A one-batch IPC message's body: per field (length, null_count) and per buffer
    (offset, length) relative to the body, flat (field k's at [2k], [2k + 1]), and where
    the body starts."""

    nodes: tuple[int, ...]
    buffers: tuple[int, ...]
    body: int


def _table_field(fb: memoryview, table: int, field: int) -> int:
    """Absolute position of a flatbuffer table's field, 0 when absent."""
    (back,) = struct.unpack_from("<i", fb, table)
    vtable = table - back
    (vtable_length,) = struct.unpack_from("<H", fb, vtable)
    slot = 4 + 2 * field
    offset = struct.unpack_from("<H", fb, vtable + slot)[0] if slot < vtable_length else 0
    return table + offset if offset else 0


def _vector(fb: memoryview, position: int) -> tuple[int, int]:
    """(start, count) of the vector a field at `position` points to."""
    start = position + struct.unpack_from("<I", fb, position)[0]
    return start + 4, struct.unpack_from("<I", fb, start)[0]


def batch_layout(view: memoryview, start: int, block: Block, n_fields: int, n_buffers: int) -> BatchLayout:
    """Parse the record batch message of `block`, whose first byte is view[start].

    The message is `0xFFFFFFFF, int32 size, flatbuffer Message { version, header_type,
    header: RecordBatch { length, nodes: [FieldNode], buffers: [Buffer], compression } }`
    padded to `metadata_length`, then the body (Arrow columnar format, IPC). Reading it
    here rather than through pyarrow's `read_record_batch` saves ~0.1 ms a sample, a
    tenth of a warm read; the shape of every tensor is still checked by the caller.
    """
    marker, size = struct.unpack_from("<Ii", view, start)
    if marker != 0xFFFFFFFF or not 0 < size <= block.metadata_length - 8:
        raise FooterError(f"record batch at byte {block.offset} has no IPC message header")
    fb = view[start + 8:start + 8 + size]
    try:
        (message,) = struct.unpack_from("<I", fb, 0)
        header_type = _table_field(fb, message, 1)
        header = _table_field(fb, message, 2)
        if not header or not header_type or fb[header_type] != 3:  # MessageHeader.RecordBatch
            raise FooterError(f"message at byte {block.offset} is not a record batch")
        batch = header + struct.unpack_from("<I", fb, header)[0]
        if _table_field(fb, batch, 3):
            raise FooterError(f"record batch at byte {block.offset} is compressed (specmill writes none)")
        nodes_at, n_nodes = _vector(fb, _table_field(fb, batch, 1))
        buffers_at, count = _vector(fb, _table_field(fb, batch, 2))
        if n_nodes != n_fields or count != n_buffers:
            raise FooterError(f"record batch at byte {block.offset} has {n_nodes} fields and {count} buffers, "
                              f"the schema needs {n_fields} and {n_buffers}")
        nodes = struct.unpack_from(f"<{2 * n_nodes}q", fb, nodes_at)
        buffers = struct.unpack_from(f"<{2 * count}q", fb, buffers_at)
    except (struct.error, IndexError) as e:
        raise FooterError(f"record batch message at byte {block.offset} is malformed ({e})") from None
    finally:
        fb.release()
    body = start + block.metadata_length
    offsets, lengths = buffers[::2], buffers[1::2]
    if count and (min(offsets) < 0 or min(lengths) < 0 or max(map(operator.add, offsets, lengths)) > block.body_length):
        raise FooterError(f"record batch at byte {block.offset} has a buffer outside its body")
    return BatchLayout(nodes=nodes, buffers=buffers, body=body)


# --------------------------------------------------------------------------- specmill samples

# The schema's fields in order: (index, kind). Kinds: "<i"/"<q"/"<f" fixed-width scalars
# (validity + values buffers), "utf8" (int32 offsets) and "large_binary" (int64 offsets),
# each validity + offsets + data buffers. SampleDecoder reads record batches by this table.
FIELDS = {name: (i, kind) for i, (name, kind) in enumerate([
    ("sample_id", "utf8"), ("source_index", "<q"), ("num_tokens", "<i"), ("input_ids", "large_binary"),
    ("loss_mask", "large_binary"), ("aux_hidden_states", "large_binary"), ("last_hidden_state", "large_binary"),
    ("position_ids", "large_binary"), ("modality_spans", "utf8"), ("temperature", "<f"), ("finish_reason", "utf8"),
])}
FIRST_BUFFER = dict(zip(FIELDS, np.cumsum([0] + [2 if k.startswith("<") else 3 for _, k in FIELDS.values()])
                        .tolist()))
N_BUFFERS = sum(2 if k.startswith("<") else 3 for _, k in FIELDS.values())
_OFFSETS_32, _OFFSETS_64 = struct.Struct("<ii"), struct.Struct("<qq")
# Per field, for SampleDecoder.from_bytes: (name, how to read it - a scalar's Struct or that
# of row 0's offsets -, and where in BatchLayout's flat tuples its null count, values (or
# offsets) buffer and data buffer are: the offset and the length of each)
_DECODE_PLAN = tuple(
    (name, 2 * i + 1,
     _OFFSETS_32 if kind == "utf8" else _OFFSETS_64 if kind == "large_binary" else struct.Struct(kind),
     2 * FIRST_BUFFER[name] + 2, 2 * FIRST_BUFFER[name] + 3, 2 * FIRST_BUFFER[name] + 4, 2 * FIRST_BUFFER[name] + 5)
    for name, (i, kind) in FIELDS.items())
_COLUMN = {name: i for name, (i, _) in FIELDS.items()}


class SampleDecoder:
    """Samples of one data set (its hidden size and dtype) as dicts of torch tensors that
    view the bytes they were decoded from."""

    def __init__(self, *, hidden_size: int, dtype: str):
        import torch

        self._torch = torch
        self.hidden_size = hidden_size
        self._hidden_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    def from_bytes(self, view: memoryview, base: int, block: Block, *, name: str, index: int) -> dict[str, object]:
        """Sample `index` of shard file `name` straight from the bytes of its record batch
        (view[0] is file byte `base`): tensors are views of `view`, no pyarrow objects in
        between. One pass over the fields (19 us a sample, where a helper call per field
        cost 28: the stream's decode runs beside the consumer's copy, and holds the GIL
        meanwhile)."""
        try:
            nodes, buffers, body = batch_layout(view, block.offset - base, block, len(FIELDS), N_BUFFERS)
        except FooterError as e:
            raise ShardError(f"{name}: sample {index} is not a readable record batch ({e})") from None
        if nodes[0] != 1:
            raise ShardError(f"{name}: sample {index} is a record batch of {nodes[0]} rows, expected 1")
        found: dict[str, object] = {}  # scalar fields: the value; the others: (position in view, bytes)
        for field, null_count, kind, values, values_length, data, data_length in _DECODE_PLAN:
            if nodes[null_count]:
                found[field] = None
            elif kind is _OFFSETS_64 or kind is _OFFSETS_32:  # `values` are the offsets: row 0's bytes in `data`
                lo, hi = kind.unpack_from(view, body + buffers[values])
                if not 0 <= lo <= hi <= buffers[data_length]:
                    raise ShardError(f"{name}: sample {index} field {field} has offsets [{lo}, {hi}) "
                                     f"outside its {buffers[data_length]}-byte data buffer")
                found[field] = (body + buffers[data] + lo, hi - lo)
            elif buffers[values_length] < kind.size:
                raise ShardError(f"{name}: sample {index} field {field} holds "
                                 f"{buffers[values_length]} bytes, expected {kind.size}")
            else:
                found[field] = kind.unpack_from(view, body + buffers[values])[0]
        torch = self._torch
        t, h, hidden = found["num_tokens"], self.hidden_size, self._hidden_dtype

        def tensor(field: str, dtype, shape: tuple[int, ...]):
            where = found[field]
            expected = math.prod(shape) * dtype.itemsize
            if where is None or where[1] != expected:
                raise ShardError(f"{name} sample {index}: field {field} holds "
                                 f"{'null' if where is None else where[1]} bytes, expected {expected} "
                                 f"for shape {shape} {dtype}")
            flat = torch.frombuffer(view, dtype=dtype, count=expected // dtype.itemsize, offset=where[0])
            return flat if len(shape) == 1 else flat.view(shape)

        def text(field: str) -> str | None:
            where = found[field]
            return None if where is None else str(view[where[0]:where[0] + where[1]], "utf-8")

        out: dict[str, object] = {
            "sample_id": text("sample_id"),
            "source_index": found["source_index"],
            "input_ids": tensor("input_ids", torch.int32, (t,)),
            "loss_mask": tensor("loss_mask", torch.uint8, (t,)),
            "aux_hidden_states": tensor("aux_hidden_states", hidden, (t, 3, h)),
            "last_hidden_state": tensor("last_hidden_state", hidden, (t, h)),
        }
        if found["position_ids"] is not None:
            out["position_ids"] = tensor("position_ids", torch.int32, (3, t))
        spans = text("modality_spans")
        out["modality_spans"] = [tuple(s) for s in json.loads(spans)] if spans else []
        out["temperature"] = found["temperature"]
        out["finish_reason"] = text("finish_reason")
        return out

    def from_batch(self, batch: pa.RecordBatch, *, name: str, index: int) -> dict[str, object]:
        """Sample `index` of shard file `name` from a record batch pyarrow read (a remote
        shard's): tensors are views of the batch's buffers."""
        torch = self._torch
        columns = batch.columns
        t = columns[_COLUMN["num_tokens"]][0].as_py()
        h = self.hidden_size

        def tensor(field: str, dtype, shape: tuple[int, ...]):
            buf = _value_buffer(columns[_COLUMN[field]])
            expected = math.prod(shape) * dtype.itemsize
            if buf.size != expected:
                raise ShardError(f"{name} sample {index}: field {field} holds {buf.size} bytes, expected "
                                 f"{expected} for shape {shape} {dtype}")
            return torch.frombuffer(memoryview(buf), dtype=dtype).view(shape)

        out: dict[str, object] = {
            "sample_id": columns[_COLUMN["sample_id"]][0].as_py(),
            "source_index": columns[_COLUMN["source_index"]][0].as_py(),
            "input_ids": tensor("input_ids", torch.int32, (t,)),
            "loss_mask": tensor("loss_mask", torch.uint8, (t,)),
            "aux_hidden_states": tensor("aux_hidden_states", self._hidden_dtype, (t, 3, h)),
            "last_hidden_state": tensor("last_hidden_state", self._hidden_dtype, (t, h)),
        }
        if columns[_COLUMN["position_ids"]].null_count == 0:
            out["position_ids"] = tensor("position_ids", torch.int32, (3, t))
        spans = columns[_COLUMN["modality_spans"]][0].as_py()
        out["modality_spans"] = [tuple(s) for s in json.loads(spans)] if spans else []
        out["temperature"] = columns[_COLUMN["temperature"]][0].as_py()
        out["finish_reason"] = columns[_COLUMN["finish_reason"]][0].as_py()
        return out


def _value_buffer(column: pa.Array) -> pa.Buffer:
    """Row 0 of a binary column as a slice of the column's own (memory-mapped) buffer.

    Not `column[0].as_buffer()`: pyarrow builds that scalar from a copy of the value,
    which halved warm read speed (`specmill shards bench`)."""
    _, offsets, data = column.buffers()
    start, end = struct.unpack_from("<qq", offsets, 8 * column.offset)
    return data.slice(start, end - start)
