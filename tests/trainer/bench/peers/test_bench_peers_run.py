"""`bench peers` without training: its settings are checked before anything runs, a peer that
could not run is reported with its error (not a crash), and the config SpecForge gets for its
draft carries the target's architecture."""

from __future__ import annotations

import json

import pytest

from trainer.bench.peers.run import Draft, PeersConfig, format_table, specforge_draft_config, summarize


def test_unknown_peers_and_recipes_are_refused_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="speculators,specforge"):
        PeersConfig(workdir=tmp_path, peers=("specmill", "eagle"))
    with pytest.raises(ValueError, match="defaults,matched"):
        PeersConfig(workdir=tmp_path, recipes=())
    with pytest.raises(ValueError, match="evaluation prompts come from evals"):
        PeersConfig(workdir=tmp_path, source="evals")


def test_a_peer_that_failed_is_in_the_table_and_json_with_its_error(tmp_path):
    metrics = {"acceptance_length": 1.5, "tokens_per_forward": 1.5, "acceptance_per_position": [0.4, 0.1, 0.0],
               "output_tokens_per_s": 20.0, "speedup": 1.1}
    ev = {"ways": {"none": metrics | {"acceptance_length": None, "acceptance_per_position": []},
                   "ngram": metrics, "eagle3": metrics}}
    drafts = [Draft(name="specmill", trainer="specmill", recipe="specmill", directory=tmp_path, train_seconds=3.0),
              Draft(name="specforge-matched", trainer="specforge", recipe="matched",
                    error="CalledProcessError: exit 1\nRuntimeError: 0 active drivers")]
    stats = {"samples": 2, "tokens": 10, "loss_tokens": 5, "distinct_loss_ids": 4}
    r = summarize(PeersConfig(workdir=tmp_path), stats, drafts, {"specmill": ev}, [], 1.0)
    assert r["drafts"][1]["eagle3"] is None and "0 active drivers" in r["drafts"][1]["error"]
    table = format_table(json.loads(json.dumps(r)))
    assert "specforge-matched" in table and "did not run: CalledProcessError: exit 1" in table
    assert "1.500" in table  # specmill's row


def test_specforge_draft_config_is_a_one_layer_llama_of_the_target(tiny_target, tmp_path):
    cfg = json.loads(specforge_draft_config(tiny_target, 300, tmp_path).read_text())
    target = json.loads((tiny_target / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 300 and cfg["vocab_size"] == target["vocab_size"]
    assert cfg["hidden_size"] == target["hidden_size"] and "rope_theta" in cfg
