"""specmill shards -> the offline formats of speculators and SpecForge.

Read through the public `shared.shards.Dataset` API; every tensor is copied as stored (bf16
hidden states stay bf16, token ids widen from int32 to int64), except where a peer's format
asks for something else, said below.

speculators (vllm-project), one directory:
    data-00000-of-00001.arrow, dataset_info.json, state.json   an HF `datasets` directory
        (written with pyarrow in the layout `datasets.save_to_disk` writes, torch format):
        input_ids list<int64>, loss_mask list<int64>, seq_len int64
    hidden_states/hs_{i}.safetensors    hidden_states [T, 4, H] = (aux_0, aux_1, aux_2, last),
        the last one *pre*-norm (speculators applies the target's norm itself); token_ids [T] int64
    token_freq.pt                       {target id: count} of loss-masked tokens, from the manifest

SpecForge (sgl-project), one directory of `torch.save` files, data_{i:08d}.ckpt:
    input_ids [T] int64, loss_mask [T] int64 (its loader adds the batch dimension),
    hidden_state [1, T, H]       the last hidden state *after* the target's final norm
    aux_hidden_state [1, T, 3H]  the three aux layers side by side

The loss mask (the usual trap). specmill's stored mask is 1 on the tokens the target generated
(assistant turns), and so is the mask each peer's own data preparation writes. The trainers
read it at different offsets. For the draft at position t (features of x_<=t, token x_{t+1},
predicting x_{t+2}):
    specmill     counts it iff mask[t+2]   (the predicted token was generated)
    speculators  counts it iff mask[t+1]   (its shift_batch drops x_0 and mask_0 together)
    SpecForge    counts it iff mask[t]     (input ids and target are shifted, the mask is not)
`alignment="native"` writes the mask as each peer's own pipeline would (what its users get);
`alignment="specmill"` shifts it left (by 1 for speculators, 2 for SpecForge, zeros coming in at
the end) so the peer counts exactly the predictions specmill counts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import torch

from shared.storage import atomic_write_bytes
from shared.shards import Dataset

log = logging.getLogger("specmill.bench.peers")

ALIGNMENTS = ("native", "specmill")
# How far left each peer's stored mask must move so that it counts specmill's predictions.
MASK_SHIFT = {"speculators": 1, "specforge": 2}
HF_ARROW = "data-00000-of-00001.arrow"
SPECFORGE_SUFFIX = ".ckpt"


def peer_loss_mask(loss_mask: torch.Tensor, peer: str, alignment: str) -> torch.Tensor:
    """The [T] int64 mask to store for `peer`: the shard's, or shifted left (see the module doc)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    mask = loss_mask.to(torch.int64)
    if alignment == "native":
        return mask
    shift = MASK_SHIFT[peer]
    out = torch.zeros_like(mask)
    out[: max(len(mask) - shift, 0)] = mask[shift:]
    return out


def check_header(ds: Dataset, peer: str) -> None:
    """Refuse a data set whose layout a peer cannot take, naming the field."""
    h = ds.manifest.header
    if peer == "speculators" and h.last_hidden_state != "pre_norm":
        raise ValueError(f"{peer}: the data set's last_hidden_state is {h.last_hidden_state!r}; speculators applies "
                         f"the target's norm itself and needs the pre-norm state, which cannot be recovered")
    if not ds.manifest.complete:
        raise ValueError("the data set is not complete (manifest.complete is false): finish the factory job first")


def vllm_aux_layer_ids(ds: Dataset) -> list[int]:
    """The aux ids in vLLM's numbering (residual entering layer i = HF hidden_states[i])."""
    h = ds.manifest.header
    shift = {"residual_entering_layer": 0, "layer_output": 1}[h.aux_layer_convention]
    return [i + shift for i in h.aux_layer_ids]


# --------------------------------------------------------------------------- speculators


def to_speculators(data: str | os.PathLike, out: Path, *, alignment: str = "native",
                   indices: Iterable[int] | None = None, hidden_states_from: Path | None = None) -> dict:
    """Write the speculators offline directory `out` (replaced atomically via out.tmp).

    `hidden_states_from`: another speculators directory of the same data set whose
    hidden_states/ is reused by a symlink (the two alignments differ only in the mask)."""
    ds = Dataset(data)
    check_header(ds, "speculators")
    order = list(range(len(ds)) if indices is None else indices)
    tmp = _fresh(out)
    states = tmp / "hidden_states"
    if hidden_states_from is not None:
        states.symlink_to((Path(hidden_states_from) / "hidden_states").resolve(), target_is_directory=True)
    else:
        states.mkdir()
    from safetensors.torch import save_file

    ids, masks, lengths = [], [], []
    for i, index in enumerate(order):
        s = ds[index]
        input_ids = s["input_ids"].to(torch.int64)  # [T]
        if hidden_states_from is None:
            # [T, 3, H] + [T, 1, H] -> [T, 4, H]: the three aux layers, then the last (pre-norm)
            stacked = torch.cat([s["aux_hidden_states"], s["last_hidden_state"][:, None]], dim=1)
            save_file({"hidden_states": stacked.contiguous(), "token_ids": input_ids}, str(states / f"hs_{i}.safetensors"))
        ids.append(input_ids.tolist())
        masks.append(peer_loss_mask(s["loss_mask"], "speculators", alignment).tolist())
        lengths.append(len(input_ids))
    write_hf_dataset(tmp, {"input_ids": pa.array(ids, pa.list_(pa.int64())),
                           "loss_mask": pa.array(masks, pa.list_(pa.int64())),
                           "seq_len": pa.array(lengths, pa.int64())})
    # Vocab counts as speculators' own preparation makes them: loss-masked ids, whole data set.
    torch.save(dict(sorted(_counts(ds, order).items())), tmp / "token_freq.pt")
    return _finish(tmp, out, ds, "speculators", alignment, order)


def write_hf_dataset(directory: Path, columns: dict[str, pa.Array]) -> None:
    """One-file HF `datasets` directory, in the layout `Dataset.save_to_disk` writes (Arrow IPC
    stream + dataset_info.json + state.json), in torch format, so `load_from_disk` reads it."""
    features = {name: _hf_feature(array.type) for name, array in columns.items()}
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    table = pa.table(columns).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    with pa.OSFile(str(directory / HF_ARROW), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    state = {"_data_files": [{"filename": HF_ARROW}], "_fingerprint": _fingerprint(directory / HF_ARROW),
             "_format_columns": None, "_format_kwargs": {}, "_format_type": "torch",
             "_output_all_columns": False, "_split": None}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (directory / "state.json").write_text(json.dumps(state, indent=2))


def read_hf_dataset(directory: Path) -> pa.Table:
    """The table of a one-file HF `datasets` directory (what `load_from_disk` memory-maps)."""
    state = json.loads((directory / "state.json").read_text())
    files = [directory / f["filename"] for f in state["_data_files"]]
    return pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files)


def _hf_feature(t: pa.DataType) -> dict:
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "List"}
    return {"dtype": str(t), "_type": "Value"}


def _fingerprint(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


# --------------------------------------------------------------------------- SpecForge


def to_specforge(data: str | os.PathLike, out: Path, *, target: Path, alignment: str = "native",
                 indices: Iterable[int] | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write the SpecForge offline directory `out` (replaced atomically via out.tmp). `target`
    supplies the final norm applied to a pre-norm last state (SpecForge stores it normed).
    `dtype`: store the hidden states in this dtype (say float32, an exact widening of bf16:
    SpecForge feeds them to the draft as they are, so they must match `model.torch_dtype`)."""
    from trainer.target import TargetArch, load_target_weights, rms_norm

    ds = Dataset(data)
    check_header(ds, "specforge")
    order = list(range(len(ds)) if indices is None else indices)
    pre_norm = ds.manifest.header.last_hidden_state == "pre_norm"
    arch = TargetArch.from_config_json(Path(target))
    if arch.hidden_size != ds.manifest.header.hidden_size:
        raise ValueError(f"specforge: target {target} has hidden_size {arch.hidden_size}, the data set "
                         f"{ds.manifest.header.hidden_size}: not the target the shards were captured from")
    norm = load_target_weights(Path(target), arch).norm if pre_norm else None
    tmp = _fresh(out)
    for i, index in enumerate(order):
        s = ds[index]
        last = s["last_hidden_state"]  # [T, H]
        if norm is not None:  # the target's final RMSNorm, as HF computes it (fp32, then x weight in bf16)
            last = rms_norm(last, norm.to(last.dtype), arch.rms_norm_eps)
        aux = s["aux_hidden_states"]  # [T, 3, H] -> [T, 3H]: layer j at columns j*H..(j+1)*H
        if dtype is not None:
            last, aux = last.to(dtype), aux.to(dtype)
        torch.save({"input_ids": s["input_ids"].to(torch.int64),
                    "loss_mask": peer_loss_mask(s["loss_mask"], "specforge", alignment),
                    "hidden_state": last.contiguous()[None],
                    "aux_hidden_state": aux.reshape(aux.shape[0], -1).contiguous()[None]},
                   tmp / f"data_{i:08d}{SPECFORGE_SUFFIX}")
    return _finish(tmp, out, ds, "specforge", alignment, order)


def target_view(target: Path, out: Path) -> Path:
    """A directory that is `target` (every file symlinked) plus the `model.safetensors.index.json`
    weight map SpecForge's target head looks for, which a single-file checkpoint lacks. The
    target's own directory (a shared cache) is never written to."""
    target = Path(target).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for f in target.iterdir():
        link = out / f.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(f)
    if not any(out.glob("*.index.json")):
        weight_map = {}
        for file in sorted(target.glob("*.safetensors")):
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                names = [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
            weight_map.update(dict.fromkeys(names, file.name))
        index = {"metadata": {"total_size": sum(f.stat().st_size for f in target.glob("*.safetensors"))},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(out / "model.safetensors.index.json", json.dumps(index, indent=1).encode())
    return out


# --------------------------------------------------------------------------- shared


def _counts(ds: Dataset, order: list[int]) -> dict[int, int]:
    """Loss-masked token counts over `order` (the manifest's own when that is the whole set)."""
    if len(order) == len(ds) and sorted(order) == list(range(len(ds))):
        return {int(k): int(v) for k, v in ds.manifest.token_counts.items()}
    counts: dict[int, int] = {}
    for index in order:
        s = ds[index]
        ids, n = s["input_ids"][s["loss_mask"].bool()].unique(return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    return counts


def _fresh(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path, ds: Dataset, peer: str, alignment: str, order: list[int]) -> dict:
    h = ds.manifest.header
    info = {"peer": peer, "alignment": alignment, "samples": len(order),
            "tokens": int(sum(int(ds.lengths()[i]) for i in order)),
            "hidden_size": h.hidden_size, "dtype": h.dtype, "aux_layer_ids_vllm": vllm_aux_layer_ids(ds),
            "last_hidden_state": "pre_norm" if peer == "speculators" else "post_norm"}
    (tmp / "specmill-conversion.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("%s (%s mask): %d samples, %d tokens -> %s", peer, alignment, info["samples"], info["tokens"], out)
    return info
