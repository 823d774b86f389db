"""The draft vocabulary and the d2t / t2d maps engines load."""

import logging

import pytest
import torch

from trainer.vocab import build_vocab


def test_d2t_offsets_map_back_to_the_most_frequent_ids_and_t2d_marks_exactly_them():
    counts = {7: 50, 3: 40, 100: 40, 42: 30, 5: 1, 99: 2}
    vocab = build_vocab(counts, target_vocab_size=128, draft_vocab_size=4)
    top4 = {7, 3, 100, 42}
    draft_ids = torch.arange(vocab.size) + vocab.d2t  # target_id = i + d2t[i]
    assert draft_ids.tolist() == sorted(top4)
    assert vocab.d2t.dtype == torch.int64 and bool((vocab.d2t >= 0).all())
    assert vocab.t2d.dtype == torch.bool and vocab.t2d.shape == (128,)
    assert set(vocab.t2d.nonzero().flatten().tolist()) == top4


def test_ties_break_towards_the_smaller_id():
    vocab = build_vocab({9: 5, 4: 5, 6: 5}, target_vocab_size=10, draft_vocab_size=2)
    assert vocab.draft_ids.tolist() == [4, 6]


def test_draft_vocab_is_capped_at_the_ids_seen(caplog):
    with caplog.at_level(logging.WARNING, logger="specmill.trainer"):
        vocab = build_vocab({1: 3, 2: 1}, target_vocab_size=10, draft_vocab_size=32000)
    assert vocab.size == 2 and "fewer than" in caplog.text


def test_ids_outside_the_target_vocab_are_refused():
    with pytest.raises(ValueError, match="outside the target vocab"):
        build_vocab({1: 3, 12: 1}, target_vocab_size=10, draft_vocab_size=4)
