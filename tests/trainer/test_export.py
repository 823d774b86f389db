"""Export to the EAGLE-3 layout vLLM and SGLang load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from trainer.checkpoint import latest_checkpoint
from trainer.export import export, load_exported, tensor_shapes
from trainer.model import DraftArch, Eagle3Draft
from trainer.run_layout import STATE_FILE
from trainer.train import train
from trainer_fixtures import export_eagle, run_config

EXPECTED_NAMES = {
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, real_data, tiny_target):
    out = tmp_path_factory.mktemp("export") / "run"
    train(run_config(out, real_data, tiny_target, steps=3, **{"draft.draft_vocab_size": 128}))
    return out


def test_export_writes_every_tensor_with_its_shape_and_the_config_engines_read(trained_run, tmp_path):
    out = export_eagle(trained_run, tmp_path / "draft")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (64, 128, 4, 2, 16)
    assert (config["vocab_size"], config["draft_vocab_size"], config["torch_dtype"]) == (512, 128, "bfloat16")
    assert config["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 512
    # the same layers in each engine's numbering: vLLM reads the top level (residual entering layer
    # i), SGLang eagle_config's (layer outputs, to which it adds 1)
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert "residual_entering_layer" in config["aux_hidden_state_layer_convention"]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert config["eagle_config"]["use_aux_hidden_state"] is True
    assert "layer_output" in config["eagle_config"]["aux_hidden_state_layer_convention"]
    assert (config["norm_before_fc"], config["norm_output"]) == (False, False)  # plain EAGLE-3 by default
    shapes = tensor_shapes(DraftArch(**{k: config[k] for k in DraftArch.__slots__}))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == EXPECTED_NAMES
        for name in EXPECTED_NAMES:
            t = f.get_tensor(name)
            assert tuple(t.shape) == shapes[name], name
            assert t.dtype == {"d2t": torch.int64, "t2d": torch.bool}.get(name, torch.bfloat16), name
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    assert torch.equal(torch.arange(128) + d2t, t2d.nonzero().flatten())


def test_export_carries_the_runs_simulated_acceptance_length_for_eval(trained_run, tmp_path):
    from trainer.evaluate import simulated_acceptance_length

    out = export_eagle(trained_run, tmp_path / "draft")
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train_al = [r["al"] for r in records if r["split"] == "train"][-1]
    val = [r["al"] for r in records if r["split"] == "val"]
    got = simulated_acceptance_length(out)
    assert got["available"] and got["value"] == (val[-1] if val else train_al)
    assert got["simulated_acceptance_length_split"] == ("val" if val else "train")


def test_an_export_loads_back_into_the_same_draft(trained_run, tmp_path, tiny_target):
    from transformers import AutoConfig

    out = export_eagle(trained_run, tmp_path / "draft32", dtype="float32")
    loaded = load_exported(out)
    state = torch.load(latest_checkpoint(trained_run / "checkpoints") / STATE_FILE, weights_only=True)["model"]
    original = Eagle3Draft(loaded.arch)
    original.load_state_dict(state)
    h = torch.randn(5, 64)
    torch.testing.assert_close(loaded.logits(h), original.logits(h), atol=0, rtol=0)
    hf = AutoConfig.from_pretrained(out)  # what vLLM parses the file with
    assert hf.num_hidden_layers == 1 and hf.draft_vocab_size == 128 and hf.head_dim == 16


def test_export_of_a_directory_without_checkpoints_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        export_eagle(tmp_path, tmp_path / "out")


def test_speculators_export_has_the_layout_and_config_vllm_reads(trained_run, tmp_path, tiny_target):
    out = export(trained_run, tmp_path / "spec", format="speculators")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Speculator"] and config["speculators_model_type"] == "eagle3"
    assert "model_type" not in config  # vLLM routes a config with speculators_config and no model_type
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3  # the run's TTT steps
    assert spec["verifier"] == {"name_or_path": str(tiny_target), "architectures": ["LlamaForCausalLM"]}
    layer = config["transformer_layer_config"]
    assert (layer["model_type"], layer["num_hidden_layers"], layer["hidden_size"], layer["vocab_size"]) == \
        ("llama", 1, 64, 512)
    assert config["draft_vocab_size"] == 128 and config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["norm_before_residual"] is False  # vLLM's default for this format is True
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert names == {n.replace("midlayer.", "layers.0.") for n in EXPECTED_NAMES}

    # what vLLM itself makes of it (its config parser only; no engine)
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    parsed = SpeculatorsConfig.from_pretrained(str(out))
    assert parsed.architectures == ["Eagle3LlamaForCausalLM"]
    assert (parsed.draft_vocab_size, parsed.norm_before_residual, parsed.norm_before_fc, parsed.norm_output) == \
        (128, False, False, False)
    assert parsed.eagle_aux_hidden_state_layer_ids == [1, 2, 3] and parsed.target_hidden_size == 64
    assert SpeculatorsConfig.extract_vllm_speculative_config(config) == {"method": "eagle3",
                                                                         "num_speculative_tokens": 3}


def test_a_speculators_export_loads_back_into_the_same_draft_as_the_eagle_one(trained_run, tmp_path):
    eagle = load_exported(export(trained_run, tmp_path / "eagle", format="eagle", dtype="float32"))
    spec = load_exported(export(trained_run, tmp_path / "spec", format="speculators", dtype="float32"))
    assert spec.arch == eagle.arch
    a, b = eagle.state_dict(), spec.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def normed_run(tmp_path_factory, real_data, tiny_target):
    out = tmp_path_factory.mktemp("export-normed") / "run"
    train(run_config(out, real_data, tiny_target, steps=3, **{"draft.draft_vocab_size": 128,
                                                              "draft.norm_before_fc": True, "draft.norm_output": True}))
    return out


@pytest.mark.parametrize("layout", ["eagle", "speculators"])
def test_eagle_31_norms_travel_through_either_export_as_vllm_reads_them_and_load_back(normed_run, tmp_path, layout):
    out = export(normed_run, tmp_path / layout, format=layout, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert (config["norm_before_fc"], config["norm_output"]) == (True, True)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "input_norm.weight" in f.keys() and tuple(f.get_tensor("input_norm.weight").shape) == (3 * 64,)
    # what vLLM's EAGLE-3 draft reads: eagle_config.norm_before_fc (absent here) else the top level, and
    # norm_output from the top level; speculators: its SpeculatorsConfig copies both from the top level
    if layout == "eagle":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(out)
        assert "norm_before_fc" not in hf.eagle_config and (hf.norm_before_fc, hf.norm_output) == (True, True)
    else:
        from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

        parsed = SpeculatorsConfig.from_pretrained(str(out))
        assert (parsed.norm_before_fc, parsed.norm_output, parsed.norm_before_residual) == (True, True, False)
    loaded = load_exported(out)
    assert (loaded.arch.norm_before_fc, loaded.arch.norm_output) == (True, True)
    state = torch.load(latest_checkpoint(normed_run / "checkpoints") / STATE_FILE, weights_only=True)["model"]
    mine = loaded.state_dict()
    assert set(mine) == set(state) and all(torch.equal(mine[k], state[k]) for k in state)
    assert not torch.equal(state["input_norm.weight"], torch.ones(3 * 64))  # trained, so a lost one would show


def test_a_warm_start_keeps_the_inits_norms_and_refuses_a_run_without_them(normed_run, tmp_path, real_data,
                                                                          tiny_target):
    init = export_eagle(normed_run, tmp_path / "init", dtype="float32")
    with pytest.raises(ValueError, match=r"norm_before_fc True \(run: False\); norm_output True \(run: False\)"):
        _setup(tmp_path / "a", real_data, tiny_target, **{"draft.init": init})
    run = _setup(tmp_path / "b", real_data, tiny_target, **{"draft.init": init, "draft.norm_before_fc": True,
                                                             "draft.norm_output": True})
    torch.testing.assert_close(run.model.input_norm.weight, load_exported(init).input_norm.weight, atol=0, rtol=0)


def test_speculators_export_names_a_verifier_that_exists(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="--verifier"):
        export(trained_run, tmp_path / "spec", format="speculators", verifier=tmp_path / "moved-away")


# --------------------------------------------------------------- warm start (draft.init)

def _setup(out, real_data, tiny_target, **overrides):
    from trainer.train import setup

    run = setup(run_config(out, real_data, tiny_target, **overrides))
    run.loader.close()
    return run


def test_a_warm_start_takes_the_exported_layer_and_maps_lm_head_rows_by_target_id(trained_run, tmp_path,
                                                                                real_data, tiny_target):
    init = export_eagle(trained_run, tmp_path / "init", dtype="float32")
    source = load_exported(init)
    # a bigger draft vocab than the init's 128: some ids are new to it
    run = _setup(tmp_path / "run", real_data, tiny_target, **{"draft.init": init, "draft.draft_vocab_size": 200})
    model, theirs = run.model, source.state_dict()
    for name, value in model.state_dict().items():
        if name not in ("lm_head.weight", "d2t", "t2d"):
            torch.testing.assert_close(value, theirs[name], atol=0, rtol=0, msg=name)
    their_rows = {int(t): r for r, t in enumerate(source.draft_ids)}
    ids = model.draft_ids.tolist()
    assert model.arch.draft_vocab_size == 200 and len(set(ids)) == 200
    shared = [i for i in ids if i in their_rows]
    assert 0 < len(shared) < 200 and run.meta["init"]["lm_head_rows_carried"] == len(shared)
    for row, target_id in enumerate(ids):
        want = theirs["lm_head.weight"][their_rows[target_id]] if target_id in their_rows \
            else theirs["lm_head.weight"].mean(0)
        torch.testing.assert_close(model.lm_head.weight[row], want, atol=0, rtol=0)
    assert run.meta["identity"]["draft.init_sha256"] == run.meta["init"]["sha256"]


def test_a_warm_started_run_resumes_and_refuses_another_init(trained_run, tmp_path, real_data, tiny_target):
    from trainer.checkpoint import CheckpointMismatch

    first = export_eagle(trained_run, tmp_path / "first", dtype="float32")
    other = export_eagle(trained_run, tmp_path / "other")  # bf16: other weights
    out = tmp_path / "run"
    train(run_config(out, real_data, tiny_target, steps=4, stop_after=2, **{"draft.init": first}))
    with pytest.raises(CheckpointMismatch, match="draft.init_sha256"):
        train(run_config(out, real_data, tiny_target, steps=4, **{"draft.init": other}))
    with pytest.raises(CheckpointMismatch, match="draft.init_sha256"):  # nor without one
        train(run_config(out, real_data, tiny_target, steps=4))
    moved = tmp_path / "moved"
    first.rename(moved)  # the path may change; the weights are what count
    assert train(run_config(out, real_data, tiny_target, steps=4, **{"draft.init": moved})).step == 4
    exported = json.loads((export_eagle(out, tmp_path / "draft") / "config.json").read_text())
    assert exported["specmill"]["init"]["sha256"] == json.loads(
        (latest_checkpoint(out / "checkpoints") / "meta.json").read_text())["init"]["sha256"]


def test_a_warm_start_from_a_draft_of_another_shape_or_layers_is_refused_by_name(trained_run, tmp_path,
                                                                             real_data, tiny_target):
    init = export_eagle(trained_run, tmp_path / "init")
    with pytest.raises(ValueError, match=r"intermediate_size 128 \(run: 64\)"):
        _setup(tmp_path / "a", real_data, tiny_target, **{"draft.init": init, "draft.intermediate_size": 64})
    config = json.loads((init / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [0, 1, 2]  # the ids vLLM reads
    (init / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"aux layers \[0, 1, 2\].*\[1, 2, 3\]"):
        _setup(tmp_path / "b", real_data, tiny_target, **{"draft.init": init})
    with pytest.raises(ValueError, match="not an exported draft"):
        _setup(tmp_path / "c", real_data, tiny_target, **{"draft.init": trained_run})  # a run dir, not an export
