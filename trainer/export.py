"""Export a checkpoint as an EAGLE-3 draft directory that vLLM and SGLang load.

--format eagle (vLLM, SGLang/SpecForge):
    DIR/config.json        LlamaForCausalLMEagle3, one layer, every field the engines read
    DIR/model.safetensors  midlayer.*, fc.weight, norm.weight, lm_head.weight, d2t, t2d
                           (+ input_norm.weight with draft.norm_before_fc)

--format speculators (vllm-project/speculators; vLLM detects it by `speculators_config`):
    DIR/config.json        Eagle3Speculator: speculators_model_type, speculators_config
                           (algorithm, proposal_methods, default_proposal_method, verifier),
                           transformer_layer_config (the one Llama layer), draft_vocab_size,
                           norm_before_residual, norm_before_fc, norm_output,
                           target_hidden_size, aux layer ids
    DIR/model.safetensors  layers.0.*, fc.weight, norm.weight, lm_head.weight, d2t, t2d
                           (+ input_norm.weight with draft.norm_before_fc)

The same tensors in both: only the decoder layer's prefix differs. The token embedding is
not written: the engines share the target's.

norm_before_fc and norm_output are written top level in both layouts with the run's values:
vLLM 0.32 reads norm_before_fc from eagle_config or else the top level and norm_output from
the top level (eagle layout), and copies both from the top level of a speculators config
(transformers_utils/configs/speculators/algos.py); absent, it takes them as false, and it
skips `input_norm.*` weights when norm_before_fc is false.

Aux layer ids. The two engines read them from different fields, in different numberings:

    vLLM    top-level `eagle_aux_hidden_state_layer_ids` (before `eagle_config`'s): id i is the
            residual stream *entering* decoder layer i (= HF `output_hidden_states[i]`)
    SGLang  `eagle_config.eagle_aux_hidden_state_layer_ids` only, as layer *outputs*: it adds 1
            and captures the residual entering that layer

so the eagle export writes both, the same layers in each engine's numbering. The data set's
manifest says which convention its ids use; ids in the "layer_output" convention are shifted
by one to vLLM's. (Which fields each engine reads, and the versions read: tests/trainer/
test_export_layouts.py.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from shared.storage import fsync_dir
from trainer.checkpoint import read_meta, resolve_checkpoint
from trainer.model import DraftArch, Eagle3Draft
from trainer.run_layout import METRICS_FILE, STATE_FILE, run_dir

log = logging.getLogger("specmill.trainer")

FORMATS = ("eagle", "speculators")
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUX_CONVENTION_NOTE = ("residual_entering_layer: id i is the residual stream entering decoder layer i, "
                       "i.e. HF output_hidden_states[i] (vLLM's numbering)")
SGLANG_AUX_CONVENTION_NOTE = ("layer_output: id i is the output of decoder layer i, i.e. HF output_hidden_states[i + 1] "
                              "(SGLang's numbering; the same layers as the top-level ids, minus one)")


def tensor_shapes(arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of an exported draft and its shape."""
    h, n, hd = arch.hidden_size, arch.num_attention_heads, arch.head_dim
    kv, i = arch.num_key_value_heads, arch.intermediate_size
    return {
        **({"input_norm.weight": (3 * h,)} if arch.norm_before_fc else {}),
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


def served_aux_layer_ids(config: dict[str, Any]) -> list[int] | None:
    """The aux layer ids vLLM takes from an exported config.json, in its numbering: the top-level
    field (both layouts), else `eagle_config`'s (specmill exports before the top-level field);
    None when neither is there (vLLM then takes its default, (2, L//2, L-3))."""
    ids = config.get("eagle_aux_hidden_state_layer_ids") \
        or (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return None if ids is None else [int(i) for i in ids]


def layer_config(arch: DraftArch, dtype: str) -> dict[str, Any]:
    """The one Llama decoder layer as a HF LlamaConfig reads it (both formats carry it)."""
    return {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": arch.hidden_size,
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
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def specmill_info(meta: dict[str, Any]) -> dict[str, Any]:
    """Where the draft came from (engines ignore it; `specmill eval` reads it)."""
    return {
        "step": meta["step"],
        "target": meta["target_name"],
        "dataset_aux_layer_ids": meta["aux_layer_ids"],
        "dataset_aux_layer_convention": meta["aux_layer_convention"],
        "dataset_fingerprint": meta["dataset_fingerprint"],
        "ttt_steps": meta["config"]["ttt"]["steps"],
        "init": meta.get("init"),  # the exported draft this one started from (draft.init), if any
    }


def normalisation(arch: DraftArch) -> dict[str, bool]:
    """The two EAGLE 3.1 settings as both layouts write them (top level, vLLM's names)."""
    return {"norm_before_fc": arch.norm_before_fc, "norm_output": arch.norm_output}


def read_normalisation(config: dict[str, Any]) -> dict[str, bool]:
    """The two settings as vLLM reads them from an exported config.json of either layout:
    norm_before_fc from eagle_config, else the top level; norm_output from the top level;
    false where absent (vLLM's default, so a draft exported before they existed, or by
    another tool, loads as the engine runs it)."""
    eagle = config.get("eagle_config") or {}
    settings = {"norm_before_fc": eagle.get("norm_before_fc", config.get("norm_before_fc", False)),
                "norm_output": config.get("norm_output", False)}
    for name, value in settings.items():
        if not isinstance(value, bool):
            raise ValueError(f"config.json: {name} must be true or false, got {value!r}")
    return settings


def eagle_config(arch: DraftArch, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    aux = vllm_aux_layer_ids(meta["aux_layer_ids"], meta["aux_layer_convention"])
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        **layer_config(arch, dtype),
        "target_hidden_size": arch.hidden_size,
        "draft_vocab_size": arch.draft_vocab_size,
        "norm_before_residual": False,
        **normalisation(arch),
        "eagle_aux_hidden_state_layer_ids": aux,  # vLLM
        "aux_hidden_state_layer_convention": AUX_CONVENTION_NOTE,
        "eagle_config": {  # SGLang (vLLM reads the field above first)
            "eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux],
            "use_aux_hidden_state": True,
            "aux_hidden_state_layer_convention": SGLANG_AUX_CONVENTION_NOTE,
        },
        "specmill": specmill_info(meta),
    }


def speculators_config(arch: DraftArch, meta: dict[str, Any], dtype: str, *, verifier: Path,
                       speculative_tokens: int) -> dict[str, Any]:
    """The speculators Eagle3Speculator config. No top-level model_type: vLLM takes a
    config.json with `speculators_config` and no model_type as its SpeculatorsConfig, which
    builds the draft's HF config from transformer_layer_config plus the eagle3 fields below.
    norm_before_residual must be written: vLLM defaults it to True for this format, and
    this draft's residual is the un-normed hidden state (False)."""
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "draft_vocab_size": arch.draft_vocab_size,
        "norm_before_residual": False,
        **normalisation(arch),
        "target_hidden_size": arch.hidden_size,
        "eagle_aux_hidden_state_layer_ids": vllm_aux_layer_ids(meta["aux_layer_ids"], meta["aux_layer_convention"]),
        "aux_hidden_state_layer_convention": AUX_CONVENTION_NOTE,
        "embed_requires_grad": False,
        "torch_dtype": dtype,
        "transformer_layer_config": layer_config(arch, dtype),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(verifier), "architectures": _verifier_architectures(verifier)},
        },
        "specmill": specmill_info(meta),
    }


def _verifier_architectures(verifier: Path) -> list[str]:
    file = Path(verifier) / "config.json"
    try:
        return list(json.loads(file.read_text()).get("architectures") or [])
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: the verifier (target) model is not there; the speculators format names "
                                "it, so pass --verifier DIR (the target's HF directory as the server will see it)") from None


def simulated_acceptance(checkpoint: Path, step: int) -> dict[str, Any]:
    """The run's simulated acceptance length at the exported step (validation if measured,
    else training), from the run's metrics.jsonl, so `specmill eval` can set it beside
    what the engine measures. Empty when the run logged none."""
    path = run_dir(checkpoint) / METRICS_FILE
    if not path.exists():
        return {}
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= step]
    for split in ("val", "train"):
        found = [r for r in records if r.get("split") == split and r.get("al") is not None]
        if found:
            return {"simulated_acceptance_length": found[-1]["al"], "simulated_acceptance_length_split": split,
                    "simulated_acceptance_length_step": found[-1]["step"]}
    return {}


def export(checkpoint: Path, out: Path, *, format: str, dtype: str = "bfloat16", verifier: Path | None = None,
           speculative_tokens: int | None = None) -> Path:
    """Write `checkpoint` (a checkpoint directory or a run's --out) as an EAGLE-3 draft in
    `out`, in the EAGLE layout or the speculators layout. `verifier` (speculators only) is
    the target as the server will find it (default: the run's target path);
    `speculative_tokens` the default draft length it declares (default: the run's TTT steps)."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    path = resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    arch = DraftArch(**meta["arch"])
    tensors = _export_tensors(path, arch, EXPORT_DTYPES[dtype])
    if format == "eagle":
        config = eagle_config(arch, meta, dtype)
    else:
        tensors = _rename(tensors, EAGLE_LAYER, SPECULATORS_LAYER)
        config = speculators_config(arch, meta, dtype, verifier=Path(verifier or meta["target_path"]),
                                    speculative_tokens=speculative_tokens or meta["config"]["ttt"]["steps"])
    config["specmill"].update(simulated_acceptance(path, meta["step"]))
    _write_atomically(Path(out), tensors, config)
    log.info("exported %s (step %d) to %s as %s (%s)", path, meta["step"], out, format, dtype)
    return Path(out)


# The decoder layer's name in each layout (every other tensor is named alike).
EAGLE_LAYER, SPECULATORS_LAYER = "midlayer.", "layers.0."


def _rename(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {new + n[len(old):] if n.startswith(old) else n: t for n, t in tensors.items()}


def _export_tensors(path: Path, arch: DraftArch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors in EAGLE names, checked against the layout, cast to
    `dtype` (the vocab maps keep theirs)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)["model"]
    shapes = tensor_shapes(arch)
    if set(state) != set(shapes):
        raise ValueError(f"{path}: model state has tensors {sorted(set(state) ^ set(shapes))} "
                         "that the EAGLE-3 layout does not (or lacks them)")
    tensors = {}
    for name, t in state.items():
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shapes[name]}")
        tensors[name] = t.contiguous() if name in ("d2t", "t2d") else t.to(dtype).contiguous()
    return tensors


def _write_atomically(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("model.safetensors", "config.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)


def load_exported(directory: Path, *, dtype: torch.dtype = torch.float32) -> Eagle3Draft:
    """Build the draft back from an export of either format (without the target embedding;
    attach it to run)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(directory) / "config.json").read_text())
    state = load_file(str(Path(directory) / "model.safetensors"))
    settings = read_normalisation(cfg)
    if "speculators_config" in cfg:
        layer = cfg["transformer_layer_config"]
        cfg = {**layer, "draft_vocab_size": cfg["draft_vocab_size"]}
        state = _rename(state, SPECULATORS_LAYER, EAGLE_LAYER)
    cfg = {**cfg, **settings}
    arch = DraftArch(**{k: cfg[k] for k in DraftArch.__slots__})
    model = Eagle3Draft(arch)
    model.load_state_dict({k: v if k in ("d2t", "t2d") else v.to(dtype) for k, v in state.items()}, strict=True)
    return model.to(dtype)


def warm_start(model: Eagle3Draft, directory: Path, *, aux_layer_ids: list[int],
               aux_layer_convention: str) -> dict[str, Any]:
    """Load an exported draft (either format) into `model`, a draft freshly initialised for
    this run (`init_from_target`): the decoder layer, fc, norm and input_norm (if any) are
    taken as they are; of lm_head, the rows of the target ids both draft vocabularies hold, and
    for the ids the init lacks the mean of its rows (d2t/t2d stay this run's vocab). The export must have this
    run's shape (draft.norm_before_fc and draft.norm_output included) and read the same aux
    layers. Returns what was carried over."""
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise ValueError(f"draft.init {directory}: not an exported draft (needs config.json and model.safetensors, "
                         "as `specmill export` writes)")
    try:
        source = load_exported(directory)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"draft.init {directory}: cannot be read as an EAGLE-3 draft: {e}") from None
    mine, theirs = model.arch.to_dict(), source.arch.to_dict()
    differ = [f"{k} {theirs[k]!r} (run: {mine[k]!r})" for k in mine if k != "draft_vocab_size" and mine[k] != theirs[k]]
    if differ:
        raise ValueError(f"draft.init {directory}: the draft has another shape than this run's: {'; '.join(differ)}; "
                         "set the draft.* sizes and settings to the init's or train from the target's head")
    theirs_aux = served_aux_layer_ids(json.loads((directory / "config.json").read_text()))
    mine_aux = vllm_aux_layer_ids(aux_layer_ids, aux_layer_convention)
    if theirs_aux is not None and list(theirs_aux) != mine_aux:
        raise ValueError(f"draft.init {directory}: trained on aux layers {list(theirs_aux)}, this data set has "
                         f"{mine_aux} (vLLM numbering): its fc would read other layers")
    state = source.state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name not in ("lm_head.weight", "d2t", "t2d"):
                value.copy_(state[name])
        # row r of theirs is target id their_ids[r]; map each of our draft ids to its row, if any
        their_row = torch.full((model.arch.vocab_size,), -1, dtype=torch.long)
        their_row[source.draft_ids] = torch.arange(source.arch.draft_vocab_size)
        rows = their_row[model.draft_ids.cpu()]
        shared = rows >= 0
        lm_head, theirs_head = model.lm_head.weight, state["lm_head.weight"]
        lm_head[shared.to(lm_head.device)] = theirs_head[rows[shared]].to(lm_head)
        # Ids new to the init start as the mean of its rows, a middling logit. Not the target's
        # rows: the trained draft's hidden state is not the target's, and on the quality data
        # set those rows gave 6,658 new ids logits that took the mass (soft CE 45.6, simulated
        # AL 1.01 on the first batches, against 9.5 and 1.95 with the mean).
        lm_head[~shared.to(lm_head.device)] = theirs_head.mean(0).to(lm_head)
    carried = int(shared.sum())
    log.info("draft.init %s: layer, fc and norms loaded; lm_head rows for %d of this run's %d draft ids "
             "(the init has %d), the other %d start as the mean of its rows", directory, carried,
             model.arch.draft_vocab_size, source.arch.draft_vocab_size, model.arch.draft_vocab_size - carried)
    with open(directory / "model.safetensors", "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(directory), "sha256": digest,
            "lm_head_rows_carried": carried, "init_draft_vocab_size": source.arch.draft_vocab_size}
