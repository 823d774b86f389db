"""Packed batches: budget, coverage, held-out split, ranks, and an exactly resumable position."""

import numpy as np
import pytest
import torch

from shared.shards import Dataset
from trainer.config import DataConfig
from trainer.data import PackedLoader, left_out, split_validation, validation_batches

from page_cache import cached_fraction, evict, o_direct_works


def test_an_epoch_covers_every_training_sample_once_within_the_budget(synth_data):
    ds = Dataset(synth_data)
    config = DataConfig(path=synth_data, token_budget=160, max_seq_len=64, val_samples=5, prefetch=2)
    held_out = split_validation(ds, seed=3, val_samples=5)
    loader = PackedLoader(ds, config, seed=3, exclude=held_out)
    lengths = np.minimum(ds.lengths(), 64)
    order = loader.epoch_order(0)
    assert len(order) == len(ds) - 5 and not set(order) & set(held_out.tolist())
    total = 0
    while True:
        (batch,) = next(loader)
        assert batch.tokens <= 160 and batch.input_ids.shape == batch.doc_ids.shape
        assert int(batch.doc_ids.max()) + 1 == batch.samples
        total += batch.tokens
        if batch.after.epoch == 1:
            break
    loader.close()
    assert total == int(lengths[order].sum())
    assert sum(b.tokens for b in validation_batches(ds, held_out, config)) == int(lengths[held_out].sum())


def test_a_restored_position_yields_the_same_batches(synth_data):
    ds = Dataset(synth_data)
    config = DataConfig(path=synth_data, token_budget=128, prefetch=3)
    none = np.zeros(0, dtype=np.int64)
    first = PackedLoader(ds, config, seed=0, exclude=none)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    expected = [next(first)[0] for _ in range(12)]  # crosses into the next epoch
    first.close()
    second = PackedLoader(Dataset(synth_data), config, seed=0, exclude=none)
    second.load_state_dict(state)
    for want in expected:
        (got,) = next(second)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.aux_hidden_states, want.aux_hidden_states)
        assert got.after == want.after
    second.close()
    assert expected[-1].after.epoch >= 1


def _sample_ids(batches) -> list[list[int]]:
    return [b.input_ids[0].tolist() for b in batches]


def test_ranks_split_each_step_so_their_union_is_the_single_rank_step(synth_data):
    """2 ranks x 1 micro-batch see exactly what 1 rank x 2 micro-batches sees, step by step,
    across an epoch boundary, and all agree on the position."""
    ds = Dataset(synth_data)
    none = np.zeros(0, dtype=np.int64)
    one = PackedLoader(ds, DataConfig(path=synth_data, token_budget=128, micro_batches=2), seed=0, exclude=none)
    ranks = [PackedLoader(ds, DataConfig(path=synth_data, token_budget=128), seed=0, exclude=none, rank=r,
                          world_size=2) for r in (0, 1)]
    for _ in range(12):  # > one epoch (40 samples of ~40 tokens, ~3 per micro-batch)
        whole = next(one)
        parts = [next(loader) for loader in ranks]
        assert len(whole) == 2 and [len(p) for p in parts] == [1, 1]
        assert _sample_ids(whole) == _sample_ids(parts[0]) + _sample_ids(parts[1])
        assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()
    assert one.state_dict()["epoch"] >= 1
    for loader in (one, *ranks):
        loader.close()


def test_an_uncached_data_set_is_streamed_around_the_page_cache_into_the_same_batches(synth_data, tmp_path):
    """The loader reads through `Dataset.stream`: an epoch of a data set that is not in the
    page cache comes from the disk with O_DIRECT (leaving the cache empty) and packs the
    very samples `ds[i]` gives, in the epoch's order."""
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(synth_data, copy)
    if not o_direct_works(copy):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    config = DataConfig(path=copy, token_budget=128, max_seq_len=64, prefetch=2)
    none = np.zeros(0, dtype=np.int64)
    reference = Dataset(copy)
    order = PackedLoader(reference, config, seed=0, exclude=none).epoch_order(0)
    want = {key: torch.cat([reference[int(i)][key][:64] for i in order]) for key in ("input_ids", "aux_hidden_states")}
    del reference
    evict(copy)
    loader = PackedLoader(Dataset(copy), config, seed=0, exclude=none)
    batches = []
    while not batches or batches[-1].after.epoch == 0:
        batches += next(loader)
    loader.close()
    assert cached_fraction(copy) < 0.1
    assert torch.equal(torch.cat([b.input_ids[0] for b in batches]), want["input_ids"].long())
    assert torch.equal(torch.cat([b.aux_hidden_states[0] for b in batches]), want["aux_hidden_states"])


def test_too_many_held_out_samples_is_refused(synth_data):
    with pytest.raises(ValueError, match="val_samples"):
        split_validation(Dataset(synth_data), seed=0, val_samples=40)


def test_a_temperature_filter_trains_and_validates_only_on_samples_of_those_temperatures(synth_data):
    ds = Dataset(synth_data)
    temps = ds.temperatures()
    greedy = set(np.flatnonzero(temps == 0).tolist())
    assert 3 < len(greedy) < len(ds)  # the synthetic mix holds 0, 0.7 and 1.0
    config = DataConfig(path=synth_data, token_budget=160, val_samples=3, temperatures=[0], prefetch=2)
    filtered = left_out(ds, config)
    held_out = split_validation(ds, seed=3, val_samples=3, exclude=filtered)
    assert set(held_out.tolist()) <= greedy
    loader = PackedLoader(ds, config, seed=3, exclude=np.union1d(held_out, filtered))
    assert sorted(loader.epoch_order(0).tolist()) == sorted(greedy - set(held_out.tolist()))
    loader.close()
    # the shards store float32, in which 0.7 is 0.69999999
    sampled = left_out(ds, DataConfig(path=synth_data, temperatures=[0.7, 1.0]))
    assert set(sampled.tolist()) == greedy
    assert len(left_out(ds, DataConfig(path=synth_data))) == 0


def test_a_temperature_filter_on_data_without_temperatures_names_the_sample_and_field(real_data):
    ds = Dataset(real_data)
    with pytest.raises(ValueError, match=f"64 of 64 samples .* sample 0, row 0 of {ds.manifest.shards[0].file}, "
                                         "field temperature is null"):
        left_out(ds, DataConfig(path=real_data, temperatures=[0]))


def test_a_temperature_filter_that_matches_nothing_lists_what_the_data_holds(synth_data):
    with pytest.raises(ValueError, match=r"no sample .* at these temperatures; .*: 0 \(\d+\), 0.7 \(\d+\), 1 \(\d+\)"):
        left_out(Dataset(synth_data), DataConfig(path=synth_data, temperatures=[0.5]))
