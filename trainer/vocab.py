"""The draft vocabulary: the N target ids the draft can predict, and the two maps engines load.

The draft vocab is the top-N most frequent loss-masked token ids of the data set (the
manifest's `token_counts`), ties broken by the smaller id so the choice is deterministic,
then sorted ascending. N = draft_vocab_size, capped at the number of distinct ids the data
set has: an id never seen as a training target could only keep its initial lm_head row and
would take a slot from nothing, so the draft is made smaller instead (with a warning).

    d2t[i]  int64 [N]   offset: target_id = i + d2t[i]   (ascending ids make it >= 0)
    t2d[j]  bool  [V]   True where target id j is in the draft vocab
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch

log = logging.getLogger("specmill.trainer")


@dataclass(kw_only=True, slots=True)
class VocabMap:
    draft_ids: torch.Tensor  # [N] int64, ascending target ids
    target_vocab_size: int

    @property
    def size(self) -> int:
        return int(self.draft_ids.numel())

    @property
    def d2t(self) -> torch.Tensor:  # [N] int64
        return self.draft_ids - torch.arange(self.size, dtype=torch.int64)

    @property
    def t2d(self) -> torch.Tensor:  # [V] bool
        mask = torch.zeros(self.target_vocab_size, dtype=torch.bool)
        mask[self.draft_ids] = True
        return mask


def build_vocab(token_counts: Mapping[int, int], *, target_vocab_size: int, draft_vocab_size: int) -> VocabMap:
    if not token_counts:
        raise ValueError("the data set's manifest has no token_counts (no loss-masked tokens): nothing to train on")
    bad = [i for i in token_counts if not 0 <= i < target_vocab_size]
    if bad:
        raise ValueError(f"manifest token_counts hold ids outside the target vocab [0, {target_vocab_size}): "
                         f"{sorted(bad)[:5]}; was the data set made with another target?")
    ranked = sorted(token_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) < draft_vocab_size:
        log.warning("draft vocab: only %d distinct loss-masked ids in the data set, fewer than "
                    "draft.draft_vocab_size = %d; using %d", len(ranked), draft_vocab_size, len(ranked))
    chosen = sorted(i for i, _ in ranked[:draft_vocab_size])
    covered = sum(c for _, c in ranked[:draft_vocab_size]) / sum(token_counts.values())
    log.info("draft vocab: %d ids cover %.2f%% of loss-masked tokens", len(chosen), 100 * covered)
    return VocabMap(draft_ids=torch.tensor(chosen, dtype=torch.int64), target_vocab_size=target_vocab_size)
