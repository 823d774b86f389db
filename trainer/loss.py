"""Training-time test (TTT): the draft unrolled k steps on its own outputs, and its loss.

Alignment (the usual trap). Tokens x_0..x_{T-1} of one sample; the target's hidden state at
position t has read x_0..x_t, so its distribution p_t = P_target(x_{t+1} | x_<=t).

    draft position t, unroll step s = 0..k-1:
      hidden input   h^0_t = fc(aux_t)                  (the target's features at t;
                                                         fc(input_norm(aux_t)) with norm_before_fc)
                     h^s_t = r(o^{s-1}_t)               (s > 0: its own output fed back)
      output         o^s_t, the decoder layer's pre-norm output;  r(o) = o, or norm(o) with
                     norm_output (Eagle3Draft.recurrent)
      token input    x_{t+1+s}                          (teacher-forced)
      rope position  t + s                              (where that draft token sits at inference)
      predicts       x_{t+2+s};  target q*_{t,s} = p_{t+1+s} restricted to the draft vocab
      counted iff    t+2+s is in the same sample, loss_mask[t+2+s] = 1 (the predicted token is
                     one the draft learns), and argmax p_{t+1+s} is in the draft vocab

Step 0 is the draft's first proposal after the target verified x_{t+1}; step s is its
(s+1)-th proposal in the same chain. This matches vLLM's EAGLE-3 proposer: draft input
ids are the target's shifted left by one, positions unshifted, then +1 per draft step.

Loss (forward KL up to the constant entropy of p, i.e. soft cross-entropy), with
V_s the counted positions of step s and w_s = step_decay^s:

    L = sum_s w_s * (1/|V_s|) * sum_{t in V_s} -sum_v p_{t+1+s}(v) log q^s_t(v)
    p_j(v)   = softmax_v( lm_head_target(norm_target(last_j))[draft_ids] )   (norm only if pre-norm)
    q^s_t(v) = softmax_v( lm_head(norm(o^s_t)) )

acc_s = fraction of V_s where argmax q^s_t = argmax p_{t+1+s}; the simulated acceptance
length is 1 + sum_k prod_{i<=k} acc_i (a chain stops at its first miss; +1 bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import TTTConfig
from trainer.data import Batch
from trainer.model import Eagle3Draft, Picked, Segments
from trainer.target import TargetHead

# Positions per chunk when computing full-vocab target logits (bounds memory at chunk x V).
TARGET_CHUNK = 1024


@dataclass(kw_only=True, slots=True)
class TargetDist:
    probs: torch.Tensor  # [B, L, N] p_j over the draft vocab (fp32)
    top1: torch.Tensor  # [B, L] int64 draft index of argmax p_j (valid where in_vocab)
    in_vocab: torch.Tensor  # [B, L] bool: the target's top-1 over its full vocab is a draft id


@dataclass(kw_only=True, slots=True)
class TTTOutput:
    loss: torch.Tensor  # scalar, differentiable
    step_loss: torch.Tensor  # [k] mean soft CE per step (detached)
    correct: torch.Tensor  # [k] int64: positions where the draft's top-1 = the target's
    counted: torch.Tensor  # [k] int64: |V_s|


@torch.no_grad()
def target_distribution(head: TargetHead, last_hidden_state: torch.Tensor, draft: Eagle3Draft,
                        needed: torch.Tensor | None = None) -> TargetDist:
    """p_j at every position j, or only where `needed` [B, L] is True (elsewhere probs stay 0,
    in_vocab False), from the stored last hidden state through the target's head.

    The target's top-1 is a draft id iff the best draft-vocab logit is at least the best of the
    rest (a tie counts as in the vocabulary). That test needs the whole head (V rows, ~12x the
    draft vocab's at the demo's sizes), so restricting it to the positions the loss reads is
    what makes the head cheap: ttt_loss reads p_j only where x_{j+1} is learned."""
    device = last_hidden_state.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else head.lm_head_weight.dtype
    w_draft, w_rest = head.split(draft.draft_ids, dtype)
    shape = last_hidden_state.shape[:-1]
    flat = last_hidden_state.flatten(0, -2)  # [B*L, H]
    rows = torch.arange(len(flat), device=device) if needed is None else needed.flatten().nonzero().squeeze(1)
    probs = torch.zeros(len(flat), len(w_draft), dtype=torch.float32, device=device)  # [B*L, N]
    top1 = torch.zeros(len(flat), dtype=torch.int64, device=device)
    in_vocab = torch.zeros(len(flat), dtype=torch.bool, device=device)
    for chunk in rows.split(TARGET_CHUNK):
        h = head.normed(flat[chunk]).to(dtype)
        logits = h @ w_draft.T  # [c, N]
        best, top1[chunk] = logits.max(-1)
        in_vocab[chunk] = (best >= (h @ w_rest.T).amax(-1)) if len(w_rest) else True
        probs[chunk] = torch.softmax(logits.float(), dim=-1)
    return TargetDist(probs=probs.view(*shape, -1), top1=top1.view(shape), in_vocab=in_vocab.view(shape))


def shift_left(x: torch.Tensor, n: int, fill: float | int | bool) -> torch.Tensor:
    """y[:, t] = x[:, t + n] along dim 1, `fill` past the end."""
    pad = x.new_full((x.shape[0], min(n, x.shape[1]), *x.shape[2:]), fill)
    return torch.cat([x[:, n:], pad], dim=1)


def ttt_unroll(draft: Eagle3Draft, batch: Batch, steps: int, segments: Segments | None = None,
               active: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run the draft `steps` times; returns o^s (the pre-norm output of step s), each [B, L, H].

    Step 0 runs on every position (later steps attend to its keys); steps 1..k-1 only where
    `active` [B, L] is True (default: everywhere), their outputs elsewhere left 0 (see Picked)."""
    segments = segments or Segments.of(batch.doc_ids)
    picked = Picked.of(torch.ones_like(batch.loss_mask) if active is None else active, segments)
    cache: list = []
    # h^0 = fc(aux), token x_{t+1}, rope position t
    hidden = draft.layer(draft.embed(shift_left(batch.input_ids, 1, 0)), draft.fuse(batch.aux_hidden_states),
                         batch.position_ids, cache, segments)  # [B, L, H]
    outputs = [hidden]
    hidden = picked.gather(hidden)  # [1, n, H]
    for s in range(1, steps):
        tokens = picked.gather(shift_left(batch.input_ids, 1 + s, 0))  # x_{t+1+s}
        # h^s = r(o^{s-1}) -> o^s
        hidden = draft.layer(draft.embed(tokens), draft.recurrent(hidden), picked.gather(batch.position_ids) + s,
                             cache, segments, picked)
        outputs.append(picked.scatter(hidden, batch.input_ids.shape))
    return outputs


def counted_positions(batch: Batch, target: TargetDist, s: int) -> torch.Tensor:
    """[B, L] bool: positions t whose step-s prediction (of x_{t+2+s}) is scored."""
    same_sample = shift_left(batch.doc_ids, 2 + s, -1) == batch.doc_ids
    learned = shift_left(batch.loss_mask, 2 + s, False)
    return same_sample & learned & shift_left(target.in_vocab, 1 + s, False)


def ttt_loss(draft: Eagle3Draft, head: TargetHead, batch: Batch, config: TTTConfig) -> TTTOutput:
    # p_{t+1+s} is read only where x_{t+2+s} is learned (counted_positions)
    target = target_distribution(head, batch.last_hidden_state, draft, needed=shift_left(batch.loss_mask, 1, False))
    scored = [counted_positions(batch, target, s) for s in range(config.steps)]
    # steps >= 1 run only where a step >= 1 is scored (the prompt's positions are not)
    later = torch.stack(scored[1:]).any(0) if config.steps > 1 else None
    outputs = ttt_unroll(draft, batch, config.steps, active=later)
    loss = torch.zeros((), device=batch.input_ids.device)
    step_loss, correct, counted = [], [], []
    for s, hidden in enumerate(outputs):
        b, t = scored[s].nonzero(as_tuple=True)  # the V_s positions
        logq = F.log_softmax(draft.logits(hidden[b, t]).float(), dim=-1)  # [|V_s|, N]
        p = target.probs[b, t + 1 + s]  # [|V_s|, N]
        soft_ce = -(p * logq).sum(-1).sum() / max(len(b), 1)
        loss = loss + config.step_decay**s * soft_ce
        step_loss.append(soft_ce.detach())
        correct.append((logq.argmax(-1) == target.top1[b, t + 1 + s]).sum())
        counted.append(torch.tensor(len(b), device=loss.device))
    return TTTOutput(loss=loss, step_loss=torch.stack(step_loss), correct=torch.stack(correct),
                     counted=torch.stack(counted))


def merge(outputs: list[TTTOutput]) -> TTTOutput:
    """One step's micro-batches as one output: loss = their mean (as gradients are averaged),
    step_loss weighted by counted positions, counts summed."""
    counted = torch.stack([o.counted for o in outputs]).sum(0)
    weighted = torch.stack([o.step_loss * o.counted for o in outputs]).sum(0)
    return TTTOutput(loss=torch.stack([o.loss for o in outputs]).mean(),
                     step_loss=weighted / counted.clamp_min(1),
                     correct=torch.stack([o.correct for o in outputs]).sum(0), counted=counted)


def acceptance_length(acc: list[float]) -> float:
    """1 + sum_k prod_{i<=k} acc_i."""
    total, run = 1.0, 1.0
    for a in acc:
        run *= a
        total += run
    return total
