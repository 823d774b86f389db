"""Export a checkpoint as an EAGLE-3 draft directory that vLLM and SGLang load.

    DIR/config.json        LlamaForCausalLMEagle3, one layer, every field the engines read
    DIR/model.safetensors  midlayer.*, fc.weight, norm.weight, lm_head.weight, d2t, t2d

The token embedding is not written: the engines share the target's.

Aux layer ids. vLLM's `eagle_aux_hidden_state_layer_ids` number the residual stream
*entering* decoder layer i (= HF `output_hidden_states[i]`). The data set's manifest says
which convention its ids use; ids in the "layer_output" convention (layer i's output =
the residual entering layer i + 1) are shifted by one so the export is always in vLLM's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from shared.manifest import fsync_dir
from trainer.checkpoint import STATE_FILE, read_meta, resolve_checkpoint
from trainer.model import DraftArch, Eagle3Draft

log = logging.getLogger("specmill.trainer")

FORMATS = ("eagle",)
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUX_CONVENTION_NOTE = ("residual_entering_layer: id i is the residual stream entering decoder layer i, "
                       "i.e. HF output_hidden_states[i] (vLLM's numbering)")


def tensor_shapes(arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of an exported draft and its shape."""
    h, n, hd = arch.hidden_size, arch.num_attention_heads, arch.head_dim
    kv, i = arch.num_key_value_heads, arch.intermediate_size
    return {
        "fc.weight": (h, 3 * h),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (n * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, n * hd),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (i, h),
        "midlayer.mlp.up_proj.weight": (i, h),
        "midlayer.mlp.down_proj.weight": (h, i),
        "norm.weight": (h,),
        "lm_head.weight": (arch.draft_vocab_size, h),
        "d2t": (arch.draft_vocab_size,),
        "t2d": (arch.vocab_size,),
    }


def vllm_aux_layer_ids(ids: list[int], convention: str) -> list[int]:
    if convention == "residual_entering_layer":
        return list(ids)
    if convention == "layer_output":
        return [i + 1 for i in ids]
    raise ValueError(f"unknown aux_layer_convention {convention!r} in the checkpoint's meta.json")


def eagle_config(arch: DraftArch, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": arch.hidden_size,
        "target_hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": arch.rope_scaling,
        "max_position_embeddings": arch.max_position_embeddings,
        "vocab_size": arch.vocab_size,
        "draft_vocab_size": arch.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "torch_dtype": dtype,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": vllm_aux_layer_ids(meta["aux_layer_ids"],
                                                                   meta["aux_layer_convention"]),
            "use_aux_hidden_state": True,
            "aux_hidden_state_layer_convention": AUX_CONVENTION_NOTE,
        },
        "specmill": {
            "step": meta["step"],
            "target": meta["target_name"],
            "dataset_aux_layer_ids": meta["aux_layer_ids"],
            "dataset_aux_layer_convention": meta["aux_layer_convention"],
            "dataset_fingerprint": meta["dataset_fingerprint"],
            "ttt_steps": meta["config"]["ttt"]["steps"],
        },
    }


def simulated_acceptance(checkpoint: Path, step: int) -> dict[str, Any]:
    """The run's simulated acceptance length at the exported step (validation if measured,
    else training), from the run's metrics.jsonl, so `specmill eval` can set it beside
    what the engine measures. Empty when the run logged none."""
    from trainer.train import METRICS_FILE

    path = checkpoint.parent.parent / METRICS_FILE  # OUT/checkpoints/step-N -> OUT/metrics.jsonl
    if not path.exists():
        return {}
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= step]
    for split in ("val", "train"):
        found = [r for r in records if r.get("split") == split and r.get("al") is not None]
        if found:
            return {"simulated_acceptance_length": found[-1]["al"], "simulated_acceptance_length_split": split,
                    "simulated_acceptance_length_step": found[-1]["step"]}
    return {}


def export_eagle(checkpoint: Path, out: Path, *, dtype: str = "bfloat16") -> Path:
    """Write `checkpoint` (a checkpoint directory or a run's --out) as an EAGLE-3 draft in `out`."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    from safetensors.torch import save_file

    path = resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    arch = DraftArch(**meta["arch"])
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)["model"]
    shapes = tensor_shapes(arch)
    if set(state) != set(shapes):
        raise ValueError(f"{path}: model state has tensors {sorted(set(state) ^ set(shapes))} "
                         "that the EAGLE-3 layout does not (or lacks them)")
    tensors = {}
    for name, t in state.items():
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shapes[name]}")
        tensors[name] = t.contiguous() if name in ("d2t", "t2d") else t.to(EXPORT_DTYPES[dtype]).contiguous()

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = eagle_config(arch, meta, dtype)
    config["specmill"].update(simulated_acceptance(path, meta["step"]))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("model.safetensors", "config.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    log.info("exported %s (step %d) to %s as EAGLE-3 (%s)", path, meta["step"], out, dtype)
    return out


def load_exported(directory: Path, *, dtype: torch.dtype = torch.float32) -> Eagle3Draft:
    """Build the draft back from an export (without the target embedding; attach it to run)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(directory) / "config.json").read_text())
    arch = DraftArch(**{k: cfg[k] for k in DraftArch.__slots__})
    model = Eagle3Draft(arch)
    state = load_file(str(Path(directory) / "model.safetensors"))
    model.load_state_dict({k: v if k in ("d2t", "t2d") else v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(dtype)
