"""The converters of `bench peers` round-trip: a sample written for speculators or SpecForge,
read back the way that peer's loader reads it (safetensors load_file, torch.load, the HF
`datasets` directory), holds the shard's tensors bit for bit; the peers are not needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.shards import Dataset
from trainer.bench.peers.convert import (peer_loss_mask, read_hf_dataset, target_view, to_specforge,
                                         to_speculators)


@pytest.fixture(scope="module")
def speculators_dir(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peers") / "speculators"
    to_speculators(synth_data, out)
    return out


def test_speculators_sample_reads_back_as_the_shard(synth_data, speculators_dir):
    ds = Dataset(synth_data)
    table = read_hf_dataset(speculators_dir).to_pydict()
    assert len(table["input_ids"]) == len(ds)
    for i in range(len(ds)):
        s = ds[i]
        hs = load_file(str(speculators_dir / "hidden_states" / f"hs_{i}.safetensors"))
        assert hs["hidden_states"].dtype == s["aux_hidden_states"].dtype
        assert torch.equal(hs["hidden_states"][:, :3], s["aux_hidden_states"])  # aux layers first
        assert torch.equal(hs["hidden_states"][:, 3], s["last_hidden_state"])  # then the last, pre-norm
        assert torch.equal(hs["token_ids"], s["input_ids"].long())
        assert table["input_ids"][i] == s["input_ids"].tolist()
        assert table["loss_mask"][i] == s["loss_mask"].tolist()  # native: speculators' own mask
        assert table["seq_len"][i] == len(s["input_ids"])
    freq = torch.load(speculators_dir / "token_freq.pt", weights_only=True)
    assert freq == {int(k): v for k, v in ds.manifest.token_counts.items()}


def test_speculators_directory_loads_with_datasets(synth_data, speculators_dir):
    datasets = pytest.importorskip("datasets", reason="`datasets` is not in the project env (it is in the "
                                                       "speculators venv the bench makes); the pyarrow read above "
                                                       "checks the same file")
    loaded = datasets.load_from_disk(str(speculators_dir))
    s = Dataset(synth_data)[3]
    row = loaded[3]  # torch format, as speculators indexes it
    assert torch.equal(row["input_ids"], s["input_ids"].long())
    assert torch.equal(row["loss_mask"], s["loss_mask"].long())


def test_specmill_alignment_shifts_the_mask_so_each_peer_counts_specmills_predictions():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1], dtype=torch.uint8)
    assert peer_loss_mask(mask, "speculators", "native").tolist() == [0, 0, 1, 1, 1, 0, 1]
    # speculators counts the prediction from t iff mask[t+1]; specmill iff mask[t+2]
    assert peer_loss_mask(mask, "speculators", "specmill").tolist() == [0, 1, 1, 1, 0, 1, 0]
    # SpecForge counts it iff mask[t]
    assert peer_loss_mask(mask, "specforge", "specmill").tolist() == [1, 1, 1, 0, 1, 0, 0]


def test_aligned_speculators_copy_shares_the_hidden_states(synth_data, speculators_dir, tmp_path):
    out = tmp_path / "aligned"
    to_speculators(synth_data, out, alignment="specmill", hidden_states_from=speculators_dir)
    assert (out / "hidden_states").resolve() == (speculators_dir / "hidden_states").resolve()
    s = Dataset(synth_data)[0]
    assert read_hf_dataset(out).to_pydict()["loss_mask"][0] == peer_loss_mask(s["loss_mask"], "speculators",
                                                                              "specmill").tolist()


def test_specforge_sample_reads_back_with_the_targets_final_norm(synth_data, tiny_target, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "specforge"
    to_specforge(synth_data, out, target=tiny_target)
    ds = Dataset(synth_data)
    files = sorted(out.glob("*.ckpt"))
    assert len(files) == len(ds)
    norm = LlamaForCausalLM.from_pretrained(tiny_target, dtype=torch.bfloat16).model.norm
    for i, f in enumerate(files):
        s, raw = ds[i], torch.load(f, weights_only=True, mmap=True)
        t, h = s["input_ids"].shape[0], ds.manifest.header.hidden_size
        assert torch.equal(raw["input_ids"], s["input_ids"].long())
        assert torch.equal(raw["loss_mask"], s["loss_mask"].long())
        assert raw["aux_hidden_state"].shape == (1, t, 3 * h)
        assert torch.equal(raw["aux_hidden_state"][0].view(t, 3, h), s["aux_hidden_states"])
        with torch.no_grad():  # SpecForge stores the state after the final norm: HF's own, bit for bit
            assert torch.equal(raw["hidden_state"][0], norm(s["last_hidden_state"]))


def test_specforge_float32_copy_is_an_exact_widening(synth_data, tiny_target, tmp_path):
    to_specforge(synth_data, tmp_path / "bf16", target=tiny_target)
    to_specforge(synth_data, tmp_path / "fp32", target=tiny_target, dtype=torch.float32)
    narrow = torch.load(next((tmp_path / "bf16").glob("*.ckpt")), weights_only=True)
    wide = torch.load(next((tmp_path / "fp32").glob("*.ckpt")), weights_only=True)
    for key in ("hidden_state", "aux_hidden_state"):
        assert wide[key].dtype == torch.float32 and torch.equal(wide[key], narrow[key].float())


def test_target_view_adds_a_weight_map_and_leaves_the_target_alone(tiny_target, tmp_path):
    before = sorted(p.name for p in tiny_target.iterdir())
    view = target_view(tiny_target, tmp_path / "view")
    assert sorted(p.name for p in tiny_target.iterdir()) == before
    index = json.loads((view / "model.safetensors.index.json").read_text())
    names = set(load_file(str(tiny_target / "model.safetensors")))
    assert set(index["weight_map"]) == names and set(index["weight_map"].values()) == {"model.safetensors"}
    assert (view / "config.json").read_text() == (tiny_target / "config.json").read_text()
