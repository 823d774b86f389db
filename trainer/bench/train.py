"""`specmill bench train`: the training loop's tokens/s against the draft's pure compute.

Two measurements of the same steps, in one run:
- loop: `train()` itself (prefetching loader, train_step, metrics, checks), `warmup + steps`
  steps logged every step; tokens/s and the fraction of step time spent waiting for data
  come from its own per-step records.
- compute: a fresh run built the same way (same seed: same init, same batches), the same
  batches read into memory (on the device) first, then `train_step` on each: forward
  (TTT unroll + loss) + backward + optimizer step, with no data path and no logging.
ratio = loop tokens/s / compute tokens/s (goal >= 0.9). The first `warmup` steps of both are
left out (the loader's first read, allocator warm-up). With `--rounds R` the pair is
repeated, alternating which goes first, so a change of load on a shared machine hits both.

A breakdown of one compute step (target head, draft forward, backward, optimizer) points
at the hot spot.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import PRECISIONS, resolve_precision

log = logging.getLogger("specmill.trainer")

GOAL = 0.9


@dataclass(kw_only=True, slots=True)
class BenchTrainConfig:
    target: Path
    # A shard data set made from `target`; None = synthetic shards with the target's shapes.
    data: Path | None = None
    synth_samples: int = 64
    synth_mean_tokens: int = 400
    token_budget: int = 2048
    ttt_steps: int = 3
    draft_vocab_size: int = 32000
    steps: int = 6
    warmup: int = 2
    rounds: int = 1
    device: str = "auto"
    precision: str = "auto"
    workdir: Path | None = None  # where runs (and synthetic shards) go; default a temporary directory

    def __post_init__(self) -> None:
        self.target = Path(self.target)
        for name in ("synth_samples", "synth_mean_tokens", "token_budget", "ttt_steps", "draft_vocab_size",
                     "steps", "rounds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bench train: --{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"bench train: --warmup must be >= 0, got {self.warmup}")
        if not (self.target / "config.json").exists():
            raise FileNotFoundError(f"{self.target}: no config.json; --target must be the target's HF directory "
                                    "(e.g. $(specmill model prepare-default | tail -1))")


def run_bench(config: BenchTrainConfig) -> dict[str, Any]:
    work = Path(config.workdir or tempfile.mkdtemp(prefix="specmill-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data, synthetic = (config.data, False) if config.data else (_synthetic_shards(config, work), True)
        rounds = []
        for r in range(config.rounds):
            order = ("loop", "compute") if r % 2 == 0 else ("compute", "loop")
            result = {name: _MEASURE[name](_train_config(config, data, work / f"round{r}-{name}"), config.warmup)
                      for name in order}
            result["ratio"] = result["compute"]["seconds"] / result["loop"]["seconds"]
            rounds.append(result)
            log.info("round %d: loop %.0f tok/s (data wait %.2f%%), compute %.0f tok/s, ratio %.3f", r,
                     result["loop"]["tokens_per_s"], 100 * result["loop"]["data_wait_fraction"],
                     result["compute"]["tokens_per_s"], result["ratio"])
        breakdown = _breakdown(_train_config(config, data, work / "breakdown"), config.warmup)
    finally:
        if config.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return _report(config, data, synthetic, rounds, breakdown)


def _report(config: BenchTrainConfig, data: Path, synthetic: bool, rounds: list[dict], breakdown: dict) -> dict:
    device = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "data": {"path": str(data) if not synthetic else None, "synthetic": synthetic},
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": ("bf16 autocast, fp32 master weights"
                      if resolve_precision(config.precision, device) == "bf16" else "fp32"),
        "rounds": rounds,
        "loop_tokens_per_s": statistics.median(r["loop"]["tokens_per_s"] for r in rounds),
        "compute_tokens_per_s": statistics.median(r["compute"]["tokens_per_s"] for r in rounds),
        "data_wait_fraction": statistics.median(r["loop"]["data_wait_fraction"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "goal": GOAL,
        "breakdown_s": breakdown,
        "load_average": os.getloadavg(),
    }


def _train_config(config: BenchTrainConfig, data: Path, out: Path):
    from trainer.config import load_config

    return load_config(None, {
        "out": out, "target.path": config.target, "data.path": data, "steps": config.warmup + config.steps,
        "data.token_budget": config.token_budget, "ttt.steps": config.ttt_steps,
        "draft.draft_vocab_size": config.draft_vocab_size, "device": config.device,
        "precision": config.precision, "log_every": 1,
        "checkpoint.every": 0, "progress": False, "seed": 0})


def _measure_loop(train_config, warmup: int) -> dict[str, float]:
    """`train()` as a user runs it; its per-step records after warmup."""
    from trainer.train import train

    result = train(train_config)
    measured = [r for r in result.records if r["split"] == "train"][warmup:]
    seconds = sum(r["seconds"] for r in measured)
    tokens = sum(r["tokens"] for r in measured)
    waited = sum(r["data_wait"] * r["seconds"] for r in measured)
    return {"steps": len(measured), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "data_wait_fraction": waited / seconds, "step_seconds": [r["seconds"] for r in measured]}


def _measure_compute(train_config, warmup: int) -> dict[str, float]:
    """`train_step` alone on the same batches, read into memory (on the device) beforehand."""
    from trainer.train import setup, train_step

    run = setup(train_config)
    steps = [[b.to(run.device) for b in next(run.loader)] for _ in range(train_config.steps)]
    run.loader.close()
    step_seconds, tokens = [], 0
    for i, batches in enumerate(steps):
        start = time.perf_counter()
        train_step(run.model, run.head, batches, run.optimizer, run.scheduler, train_config, run.world)
        _sync(run.device)
        if i >= warmup:
            step_seconds.append(time.perf_counter() - start)
            tokens += sum(b.tokens for b in batches)
    seconds = sum(step_seconds)
    return {"steps": len(step_seconds), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "step_seconds": step_seconds}


_MEASURE = {"loop": _measure_loop, "compute": _measure_compute}


def _breakdown(train_config, warmup: int) -> dict[str, float]:
    """Seconds per step in each part of train_step, the mean over the measured batches."""
    from trainer.loss import shift_left, target_distribution, ttt_loss
    from trainer.train import autocast, setup

    run = setup(train_config)
    batches = [next(run.loader)[0].to(run.device) for _ in range(train_config.steps)]
    run.loader.close()
    parts = {"target_head": 0.0, "draft_forward_and_loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    params = [p for p in run.model.parameters() if p.requires_grad]
    for i, batch in enumerate(batches):
        clock = _Clock(run.device)
        with autocast(run.device, train_config.precision):
            target_distribution(run.head, batch.last_hidden_state, run.model,
                                needed=shift_left(batch.loss_mask, 1, False))
            head = clock.lap()
            out = ttt_loss(run.model, run.head, batch, train_config.ttt)  # recomputes the head: subtracted
            forward = clock.lap() - head
        out.loss.backward()
        backward = clock.lap()
        torch.nn.utils.clip_grad_norm_(params, train_config.optim.grad_clip or math.inf)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        optimizer = clock.lap()
        if i >= warmup:
            for name, value in zip(parts, (head, forward, backward, optimizer)):
                parts[name] += value / (len(batches) - warmup)
    return parts


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device
        _sync(device)
        self.last = time.perf_counter()

    def lap(self) -> float:
        _sync(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_shards(config: BenchTrainConfig, work: Path) -> Path:
    """Synthetic shards with the target's shapes (hidden size, vocab, layers)."""
    from shared.synth import SynthConfig, write_synthetic
    from trainer.target import TargetArch

    arch = TargetArch.from_config_json(config.target)
    out = work / "synthetic-shards"
    write_synthetic(out, SynthConfig(samples=config.synth_samples, hidden_size=arch.hidden_size,
                                     vocab=arch.vocab_size, num_layers=arch.num_hidden_layers,
                                     mean_tokens=min(config.synth_mean_tokens, config.token_budget // 2),
                                     max_tokens=config.token_budget),
                    progress=True)
    return out


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=Path, required=True, help="target model directory (HF config.json + safetensors)")
    p.add_argument("--data", type=Path, default=None,
                   help="shard data set made from the target (default: synthetic shards with its shapes)")
    p.add_argument("--synth-samples", type=int, default=None, help="samples of the synthetic data set")
    p.add_argument("--token-budget", type=int, default=None, help="tokens per packed batch")
    p.add_argument("--ttt-steps", type=int, default=None, help="training-time-test unroll length k")
    p.add_argument("--draft-vocab-size", type=int, default=None, help="draft vocabulary size")
    p.add_argument("--steps", type=int, default=None, help="measured steps per round")
    p.add_argument("--warmup", type=int, default=None, help="steps left out at the start of each measurement")
    p.add_argument("--rounds", type=int, default=None, help="loop/compute pairs, alternating which goes first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto: bf16 autocast on a GPU or a CPU with bf16 matrix instructions (AMX, "
                        "AVX512-BF16), fp32 on other CPUs")
    p.add_argument("--workdir", type=Path, default=None, help="keep runs here (default: a temporary directory)")
    p.add_argument("--json", dest="json_path", type=Path, default=None, help="write the report here")


_FIELDS = ("target", "data", "synth_samples", "token_budget", "ttt_steps", "draft_vocab_size", "steps", "warmup",
           "rounds", "device", "precision", "workdir")


def run_cli(args: argparse.Namespace) -> int:
    from trainer.train import huge_page_tensors

    huge_page_tensors()  # as `specmill train` does (process-wide, so here and not in run_bench)
    config = BenchTrainConfig(**{f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None})
    report = run_bench(config)
    data = "synthetic shards (target's shapes)" if report["data"]["synthetic"] else report["data"]["path"]
    print(f"bench train on {report['device']}, {report['precision']}; data: {data}")
    print(f"  token budget {config.token_budget}, TTT steps {config.ttt_steps}, {config.steps} measured steps "
          f"x {config.rounds} round(s) after {config.warmup} warm-up")
    for i, r in enumerate(report["rounds"]):
        print(f"  round {i}: loop {r['loop']['tokens_per_s']:.0f} tok/s (data wait "
              f"{100 * r['loop']['data_wait_fraction']:.2f}%), compute {r['compute']['tokens_per_s']:.0f} tok/s, "
              f"ratio {r['ratio']:.3f}")
    print(f"loop {report['loop_tokens_per_s']:.0f} tok/s, pure compute {report['compute_tokens_per_s']:.0f} tok/s, "
          f"ratio {report['ratio']:.3f} (goal >= {GOAL}), data wait {100 * report['data_wait_fraction']:.2f}% "
          "(goal < 2%)")
    parts = report["breakdown_s"]
    total = sum(parts.values())
    print("one compute step: " + ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in parts.items()))
    print(f"load average during the run: {report['load_average'][0]:.2f} (a shared machine: compare ratios)")
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=1))
        print(f"report {args.json_path}")
    return 0
