"""The training loop: `train(config)` = load, then loop {step, log, eval, checkpoint}."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from shared.shards import Dataset
from trainer.checkpoint import Checkpointer, RNGState, check_compatible, read_meta
from trainer.config import OptimConfig, TrainConfig, TTTConfig, resolve_precision
from trainer.data import Batch, PackedLoader, dataset_fingerprint, left_out, split_validation, validation_batches
from trainer.distributed import OptimizerState, ShardedModelState, World, init_world, shard_draft
from trainer.export import warm_start
from trainer.loss import TTTOutput, acceptance_length, merge, ttt_loss
from trainer.model import DraftArch, Eagle3Draft
from trainer.run_layout import CURVES_FILE, METRICS_FILE, checkpoint_name
from trainer.target import TargetArch, TargetHead, load_target_weights, target_fingerprint
from trainer.vocab import build_vocab

log = logging.getLogger("specmill.trainer")


@dataclass(kw_only=True, slots=True)
class LoopState:
    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


@dataclass(kw_only=True, slots=True)
class Run:
    """Everything a training run works with, built by `setup` before the first step."""

    config: TrainConfig
    world: World
    device: torch.device
    model: Eagle3Draft
    head: TargetHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: PackedLoader
    held_out: np.ndarray  # this rank's share of the validation samples
    loop: LoopState
    components: dict[str, Any]  # name -> resumable component, as saved in a checkpoint
    meta: dict[str, Any]  # the checkpoint's meta.json, less what changes per save
    checkpointer: Checkpointer


@dataclass(kw_only=True, slots=True)
class TrainResult:
    step: int
    losses: list[float]  # the loss of every step this call ran, in order
    records: list[dict[str, Any]]  # what was logged (train and validation)
    checkpoint: Path | None
    stopped_early: bool = False


def train(config: TrainConfig) -> TrainResult:
    run = setup(config)
    loop, loader = run.loop, run.loader
    resume(run)
    metrics = MetricsLog(config.out / METRICS_FILE, resumed_at=loop.step, enabled=run.world.is_main)
    result = TrainResult(step=loop.step, losses=[], records=[], checkpoint=run.checkpointer.latest())
    meter = Meter(config.ttt, run.world)
    end = min(config.steps, config.stop_after or config.steps)
    preempted = False
    with _sigterm_flag() as sigterm, tqdm(total=config.steps, initial=loop.step, unit="step", desc="train",
                                        disable=not (config.progress and run.world.is_main)) as bar:
        while loop.step < end:
            waited = loader.wait_seconds
            batches = [b.to(run.device) for b in next(loader)]
            out = train_step(run.model, run.head, batches, run.optimizer, run.scheduler, config, run.world)
            tokens = sum(b.tokens for b in batches)
            loop.step, loop.tokens = loop.step + 1, loop.tokens + tokens
            result.losses.append(out["loss"])
            meter.add(out, tokens, samples=sum(b.samples for b in batches), data_wait=loader.wait_seconds - waited)
            bar.update()
            if loop.step % config.log_every == 0 or loop.step == end:
                record = metrics.write({"step": loop.step, "split": "train", **meter.summary(),
                                        "data_position": loader.state_dict()})
                result.records.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", al=f"{record['al']:.2f}")
                log.info(_format(record))
            if config.eval_every and loop.step % config.eval_every == 0 and loop.step < config.steps:
                result.records.append(metrics.write(evaluate_held_out(run)))
            preempted = run.world.any(sigterm.is_set())
            if preempted or loop.step == end or (config.checkpoint.every and loop.step % config.checkpoint.every == 0):
                result.checkpoint = save(run)
            if preempted:
                break
    loader.close()
    result.stopped_early = loop.step < config.steps
    if result.stopped_early:
        log.info("stopped at step %d of %d (%s); run the same command again to resume", loop.step, config.steps,
                 "SIGTERM" if preempted else f"stop_after = {config.stop_after}")
    elif config.data.val_samples and result.losses:
        result.records.append(metrics.write(evaluate_held_out(run)))
    if run.world.is_main:
        plot_curves(metrics.read(), config.out / CURVES_FILE)
    run.world.close()
    result.step = loop.step
    return result


def setup(config: TrainConfig) -> Run:
    """Load the data set and the target's head, build the draft, optimizer and data stream."""
    world, device = init_world(config.device)
    torch.manual_seed(config.seed)
    ds = Dataset(config.data.path)
    target_arch = TargetArch.from_config_json(config.target.path)
    _check_data_fits_target(ds, target_arch, config)
    vocab = build_vocab(ds.manifest.token_counts, target_vocab_size=target_arch.vocab_size,
                        draft_vocab_size=config.draft.draft_vocab_size)
    arch = DraftArch.resolve(target_arch, config.draft, draft_vocab_size=vocab.size)
    weights = load_target_weights(config.target.path, target_arch,
                                  dtype=torch.float32 if device.type == "cpu" else None)
    model = Eagle3Draft(arch)
    model.init_from_target(weights, vocab)
    init = warm_start(model, config.draft.init, aux_layer_ids=list(ds.header.aux_layer_ids),
                      aux_layer_convention=ds.header.aux_layer_convention) if config.draft.init else None
    model.to(device)
    if config.distributed.strategy == "fsdp" and world.size > 1:
        shard_draft(model, world)
    head = TargetHead(weights, eps=target_arch.rms_norm_eps,
                      pre_norm=ds.header.last_hidden_state == "pre_norm").to(device)
    optimizer, scheduler = build_optimizer(model, config.optim, total_steps=config.steps)
    filtered = left_out(ds, config.data)  # by data.temperatures
    held_out = split_validation(ds, seed=config.seed, val_samples=config.data.val_samples, exclude=filtered) \
        if config.data.val_samples else np.zeros(0, dtype=np.int64)
    loader = PackedLoader(ds, config.data, seed=config.seed, exclude=np.union1d(held_out, filtered),
                          rank=world.rank, world_size=world.size, pin_memory=device.type == "cuda")
    loop = LoopState()
    precision = resolve_precision(config.precision, device.type)
    # Each in a layout that does not depend on the rank count (the data position is global).
    components = {"model": ShardedModelState(model) if world.sharded else model,
                  "optimizer": OptimizerState(model, optimizer), "scheduler": scheduler,
                  "data": loader, "rng": RNGState(), "loop": loop}
    log.info("%s: draft of %d trainable params, draft vocab %d, %d train / %d held-out samples%s, "
             "%d rank(s) on %s, %s matmuls (precision = %s)", config.out,
             sum(p.numel() for p in model.parameters() if p.requires_grad), vocab.size,
             len(ds) - len(held_out) - len(filtered), len(held_out),
             f" ({len(filtered)} left out by data.temperatures = {list(config.data.temperatures)})"
             if config.data.temperatures is not None else "", world.size, device, precision, config.precision)
    return Run(config=config, world=world, device=device, model=model, head=head, optimizer=optimizer,
               scheduler=scheduler, loader=loader, held_out=held_out[world.rank::world.size], loop=loop,
               components=components,
               meta=_run_meta(config, ds, arch, world, init, precision),
               checkpointer=Checkpointer(config.out, keep=config.checkpoint.keep))


def resume(run: Run) -> None:
    """Continue from the newest checkpoint in --out, if any and if it is this run's."""
    path = run.checkpointer.latest()
    if path is None:
        return
    check_compatible(read_meta(path), run.meta, path=path)
    run.checkpointer.load(path, run.components)
    log.info("resumed from %s at step %d", path, run.loop.step)


def save(run: Run) -> Path:
    """Checkpoint on rank 0 (every rank takes part in gathering sharded state)."""
    state = {name: c.state_dict() for name, c in run.components.items()}
    _check_ranks_agree(run)
    path = run.checkpointer.dir / checkpoint_name(run.loop.step)
    if run.world.is_main:
        meta = {**run.meta, "data_position": state["data"], "tokens": run.loop.tokens}
        path = run.checkpointer.save(run.loop.step, state, meta)
    run.world.barrier()
    return path


def train_step(model: Eagle3Draft, head: TargetHead, batches: list[Batch], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig,
               world: World = World()) -> dict[str, Any]:
    """One optimizer step on this rank's micro-batches (already on the device). No I/O.

    grad = mean over ranks of the mean over micro-batches of each one's loss gradient; the
    1/m is applied to each loss before backward (a power of two scales exactly)."""
    model.train()
    lr = scheduler.get_last_lr()[0]
    outs = []
    for batch in batches:
        with autocast(batch.input_ids.device, config.precision):
            out = ttt_loss(model, head, batch, config.ttt)
        (out.loss / len(batches)).backward()
        outs.append(out)
    params = [p for p in model.parameters() if p.requires_grad]
    world.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip or math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out = merge(outs)
    return {"loss": out.loss.item(), "out": out, "lr": lr, "grad_norm": float(_full(grad_norm))}


@torch.no_grad()
def evaluate(model: Eagle3Draft, head: TargetHead, batches: Iterator[Batch], config: TTTConfig,
             device: torch.device, world: World = World(), *, precision: str = "auto") -> dict[str, Any]:
    """Loss, per-step accuracy and simulated AL over `batches` (summed over ranks), token-weighted."""
    model.eval()
    meter = Meter(config, world)
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            out = ttt_loss(model, head, batch, config)
        meter.add({"out": out}, batch.tokens, samples=batch.samples)
    return meter.summary(train=False)


def evaluate_held_out(run: Run) -> dict[str, Any]:
    batches = validation_batches(Dataset(run.config.data.path), run.held_out, run.config.data)
    record = {"step": run.loop.step, "split": "val",
              **evaluate(run.model, run.head, batches, run.config.ttt, run.device, run.world,
                         precision=run.config.precision)}
    log.info(_format(record))
    return record


def build_optimizer(model: Eagle3Draft, config: OptimConfig, *, total_steps: int):
    """AdamW (decay on matrices only) and a warmup + cosine (or constant) LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    warmup = int(round(config.warmup_fraction * total_steps))
    factor = functools.partial(lr_factor, warmup=warmup, total=total_steps, schedule=config.schedule,
                               min_ratio=config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Meter:
    """Sums over a logging interval (and over ranks); `summary()` makes one record and resets."""

    def __init__(self, config: TTTConfig, world: World = World()):
        self.weights = torch.tensor([config.step_decay**s for s in range(config.steps)], dtype=torch.float64)
        self.world = world
        self._reset()

    def _reset(self) -> None:
        k = len(self.weights)
        self.ce_sum = torch.zeros(k, dtype=torch.float64)
        self.correct = torch.zeros(k, dtype=torch.float64)
        self.counted = torch.zeros(k, dtype=torch.float64)
        self.tokens = self.samples = self.data_wait = 0.0
        self.losses: list[float] = []
        self.grad_norm = self.lr = 0.0
        self.started = time.perf_counter()

    def add(self, step: dict[str, Any], tokens: int, *, samples: int, data_wait: float = 0.0) -> None:
        out: TTTOutput = step["out"]
        counted = out.counted.double().cpu()
        self.ce_sum += out.step_loss.double().cpu() * counted
        self.correct += out.correct.double().cpu()
        self.counted += counted
        self.tokens += tokens
        self.samples += samples
        self.data_wait += data_wait
        if "loss" in step:
            self.losses.append(step["loss"])
            self.grad_norm, self.lr = step["grad_norm"], step["lr"]

    def summary(self, train: bool = True) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        k = len(self.weights)
        local = torch.cat([self.ce_sum, self.correct, self.counted,
                           torch.tensor([self.tokens, self.samples, sum(self.losses), len(self.losses),
                                         self.data_wait], dtype=torch.float64)])
        total = self.world.sum(local.to(self.world.device) if self.world.size > 1 else local).cpu()
        ce_sum, correct, counted = total[:k], total[k:2 * k], total[2 * k:3 * k]
        tokens, samples, loss_sum, n_losses, data_wait = total[3 * k:].tolist()
        acc = (correct / counted.clamp_min(1)).tolist()
        step_ce = ce_sum / counted.clamp_min(1)
        record: dict[str, Any] = {
            # train: the mean of the steps' losses; val: the step-weighted sum of token-weighted CEs
            "loss": loss_sum / max(n_losses, 1) if train else float((self.weights * step_ce).sum()),
            "step_loss": step_ce.tolist(),
            "acc": acc,
            "al": acceptance_length(acc),
            "counted_tokens": [int(c) for c in counted.tolist()],
            "tokens": int(tokens),
            "samples": int(samples),
        }
        if train:
            record.update(lr=self.lr, grad_norm=self.grad_norm, tokens_per_s=tokens / elapsed,
                          data_wait=data_wait / self.world.size / elapsed, seconds=elapsed)
        self._reset()
        return record


class MetricsLog:
    """`metrics.jsonl`, one record per line; on resume, records after the resumed step (written
    by the interrupted run after its last checkpoint) are dropped so the file has no repeats."""

    def __init__(self, path: Path, *, resumed_at: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:  # not rank 0
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.read() if r["step"] <= resumed_at]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def read(self) -> list[dict[str, Any]]:
        if not self.enabled or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """loss, per-step accuracy, simulated AL and lr against step (train, and val if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    if not train:
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in train]
    (ax_loss, ax_acc), (ax_al, ax_lr) = axes
    ax_loss.plot(steps, [r["loss"] for r in train], label="train")
    ax_al.plot(steps, [r["al"] for r in train], label="train")
    for i in range(len(train[0]["acc"])):
        ax_acc.plot(steps, [r["acc"][i] for r in train], label=f"acc_{i}")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
        ax_al.plot([r["step"] for r in val], [r["al"] for r in val], "o-", label="val")
    ax_lr.plot(steps, [r["lr"] for r in train])
    for ax, title in ((ax_loss, "loss (weighted soft CE)"), (ax_acc, "top-1 accuracy per TTT step"),
                      (ax_al, "simulated acceptance length"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax is not ax_lr:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- helpers


def huge_page_tensors() -> None:
    """Back large CPU tensors with 2 MiB transparent huge pages (torch's THP_MEM_ALLOC_ENABLE,
    read at the first allocation after this; a value already set wins).

    A CPU step allocates and frees tensors of tens to hundreds of MB (logits over the draft
    vocab, the target's distribution); glibc maps each afresh and unmaps it on free, so every
    step faults its working set in again, 4 KiB at a time: on the quality data (2,048-token
    steps, draft vocab 24k, 1 thread) 763k minor faults and 1.46 s of kernel time a step; in
    huge pages 30k and 0.75 s, and the memory is still given back on free. (Keeping freed
    memory in glibc's heap instead, mallopt, cut the faults further but let the heap grow to
    19 GB over a long run.) Process-wide, so called by the `specmill train` and `bench train`
    commands, not by `train()`; THP must be `always` or `madvise` in
    /sys/kernel/mm/transparent_hugepage/enabled."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def autocast(device: torch.device, precision: str):
    """bf16 matmuls with fp32 master weights, or plain fp32 (config.resolve_precision). Either
    is deterministic on CPU, so resumption stays exact."""
    if resolve_precision(precision, device.type) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value as a whole tensor; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_data_fits_target(ds: Dataset, target: TargetArch, config: TrainConfig) -> None:
    header = ds.header
    for what, data_value, target_value in (("hidden_size", header.hidden_size, target.hidden_size),
                                           ("vocab_size", header.target.vocab_size, target.vocab_size),
                                           ("num_hidden_layers", header.target.num_hidden_layers,
                                            target.num_hidden_layers)):
        if data_value != target_value:
            raise ValueError(f"data set {config.data.path} was made from a target with {what} = {data_value}, "
                             f"but {config.target.path}/config.json has {target_value}: wrong target or data set")


def _run_meta(config: TrainConfig, ds: Dataset, arch: DraftArch, world: World,
              init: dict[str, Any] | None, precision: str) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        # What must match on resume. The global batch (micro-batches per step, all ranks
        # together), not the rank count: the checkpoint's state is the same on any (elastic
        # resume). precision as resolved here: an "auto" run started on a CPU with AMX (bf16)
        # must not go on in fp32 on one without.
        "identity": {**config.identity(), "global_micro_batches": world.size * config.data.micro_batches,
                     "precision": precision, "draft.init_sha256": init and init["sha256"]},
        "world_size": world.size,
        "init": init,
        "dataset_fingerprint": dataset_fingerprint(ds),
        "dataset_path": str(config.data.path),
        "target_fingerprint": target_fingerprint(config.target.path),
        "target_path": str(config.target.path),
        "arch": arch.to_dict(),
        "aux_layer_ids": list(ds.header.aux_layer_ids),
        "aux_layer_convention": ds.header.aux_layer_convention,
        "last_hidden_state": ds.header.last_hidden_state,
        "target_name": ds.header.target.name,
        "torch_version": torch.__version__,
    }


def _check_ranks_agree(run: Run) -> None:
    """Ranks take their steps from one global stream, so their data positions must be equal, and
    apply the same averaged update, so their weights must be too; check before saving (sharded
    ranks hold different shards: no weights to compare)."""
    if run.world.size == 1:
        return
    positions = run.world.gather(run.loader.state_dict())
    if any(p != positions[0] for p in positions):
        raise RuntimeError(f"ranks are at different data positions at step {run.loop.step} ({positions}); "
                           "refusing to checkpoint a diverged run")
    if run.world.sharded:
        return
    with torch.no_grad():
        digest = float(sum(p.double().abs().sum() for p in run.model.parameters()))
    digests = run.world.gather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel ranks hold different weights at step {run.loop.step} ({digests}); "
                           "refusing to checkpoint a diverged run")


@contextlib.contextmanager
def _sigterm_flag():
    """An Event set by SIGTERM while training (the loop then saves and exits)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _format(r: dict[str, Any]) -> str:
    acc = " ".join(f"{a:.3f}" for a in r["acc"])
    text = f"{r['split']} step {r['step']}: loss {r['loss']:.4f} acc [{acc}] AL {r['al']:.3f}"
    if r["split"] == "train":
        text += (f" lr {r['lr']:.2e} grad_norm {r['grad_norm']:.3f} tok/s {r['tokens_per_s']:.0f} "
                 f"data_wait {100 * r['data_wait']:.1f}%")
    return text
