"""`specmill bench peers`: one shard data set, drafts from specmill and from its peers' trainers,
each measured by `specmill eval` in vLLM on the same held-out prompts.

Data: `--samples` prompts of `--source` (default ShareGPT first questions) resampled by the
default target through the factory; evaluation prompts come from another package (`evals`).
Every draft is trained on that one data set:
  specmill     `specmill train` (the recipe of `bench quality`: lr 1e-3, TTT 3, 2,048-token
               batches) for `--epochs` passes, `specmill export --format eagle`
  speculators  speculators 0.9.0 in its own venv, through shims/speculators_cpu.py
  specforge    SpecForge 0.2.0 in its own venv, through shims/specforge_cpu.py
and for each peer two recipes:
  defaults  the peer's own defaults (what its users get: its optimizer, lr, schedule, TTT
            length and weights, batch size, loss-mask alignment, validation split) with a 32k
            draft vocab (the field's usual size; the data has fewer distinct ids, so each peer
            fills the rest its own way), for the same `--epochs` (both peers default to more
            epochs than 2 cores can run: speculators 20)
  matched   the same tokens as specmill's run and, where configurable, its draft vocab (the same
            ids), TTT length, batch tokens and loss-mask alignment (see convert.py)
A peer that cannot run is recorded with its error in the JSON and the table; the bench goes on.

Like `bench quality` it drives each step as a subprocess and resumes: a step whose output
exists is skipped (`--redo` names steps to run again).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.demo import CAPTURE_BACKEND, Steps
from shared.storage import atomic_write_bytes

log = logging.getLogger("specmill.bench.peers")

PEERS = ("specmill", "speculators", "specforge")
RECIPES = ("defaults", "matched")
DEFAULT_DRAFT_VOCAB = 32000
SHIMS = Path(__file__).parent / "shims"
# SpecForge checkpoints every this many steps (batch 1 = one sample a step), so a run stopped at
# --peer-limit still leaves a draft; a step takes 1-5 s on 2 CPU cores, and each checkpoint (with
# its optimizer state) ~130 MB of the default target's draft, kept by SpecForge: every 5 steps
# filled 20 GB in 765 steps.
SPECFORGE_SAVE_INTERVAL = 50


@dataclass(kw_only=True, slots=True)
class PeersConfig:
    workdir: Path = Path("runs/peers")
    # Training conversations. 300 fits a 2-core machine shared with other work in about an hour
    # end to end (the factory generates ~15-100 tok/s there); the figures grow with more.
    samples: int = 300
    source: str = "sharegpt"  # training prompts; evaluation prompts are always `evals`
    eval_prompts: int = 24
    max_tokens: int = 96  # per resampled answer
    eval_max_tokens: int | None = None  # per evaluated answer (None: max_tokens)
    epochs: int = 2  # passes over the data set, for every trainer (the budget)
    token_budget: int = 2048  # specmill's tokens per batch (and the matched peers')
    ttt_steps: int = 3  # specmill's unroll (and the matched peers')
    lr: float = 1e-3  # specmill's
    k: int = 3  # speculative tokens in the evaluation
    # Wall-clock limit of one peer training run; past it the run is stopped, and the checkpoint it
    # saved last (if any) is exported and evaluated, marked as stopped. None: no limit.
    peer_limit_s: float | None = None
    peers: tuple[str, ...] = PEERS
    recipes: tuple[str, ...] = RECIPES
    redo: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.eval_max_tokens is not None and self.eval_max_tokens <= 0:
            raise ValueError(f"bench peers: --eval-max-tokens must be positive, got {self.eval_max_tokens}")
        for name in ("samples", "eval_prompts", "max_tokens", "epochs", "token_budget", "ttt_steps", "k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bench peers: --{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.peers, self.recipes = tuple(self.peers), tuple(self.recipes)
        for name, given, allowed in (("peers", self.peers, PEERS), ("recipes", self.recipes, RECIPES)):
            bad = [x for x in given if x not in allowed]
            if bad or not given:
                raise ValueError(f"bench peers: --{name} takes a comma-separated subset of {','.join(allowed)}, "
                                 f"got {','.join(given) or 'nothing'}")
        if self.source == "evals":
            raise ValueError("bench peers: --source must not be evals (the evaluation prompts come from evals)")


@dataclass(kw_only=True, slots=True)
class Draft:
    """One trained draft (or the reason there is none)."""

    name: str
    trainer: str
    recipe: str
    settings: dict = field(default_factory=dict)
    directory: Path | None = None
    train_seconds: float | None = None
    error: str | None = None


def run_peers(config: PeersConfig) -> dict:
    w = config.workdir.resolve()
    w.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step = Steps(log)
    model = Path(step("prepare and verify the default target", "model", "prepare-default").strip().splitlines()[-1])
    train_prompts, eval_prompts, data = w / "train-prompts.jsonl", w / "eval-prompts.jsonl", w / "data"
    step(f"prompts: {config.samples} from {config.source}", "factory", "prompts", "--source", config.source,
         "--n", str(config.samples), "--out", str(train_prompts), done=train_prompts)
    step(f"prompts: {config.eval_prompts} held out, from evals", "factory", "prompts", "--source", "evals",
         "--n", str(config.eval_prompts), "--out", str(eval_prompts), done=eval_prompts)
    step("factory: resample the answers, capture hidden states", "factory", "run", "--model", str(model),
         "--prompts", str(train_prompts), "--out", str(data), "--max-tokens", str(config.max_tokens),
         "--max-samples", str(config.samples), "--capture-backend", CAPTURE_BACKEND)
    step("verify the shards", "shards", "verify", str(data))
    stats = data_stats(data, config)

    drafts: list[Draft] = []
    if "specmill" in config.peers:
        drafts.append(train_specmill(config, step, model, data, w, stats))
    for peer in ("speculators", "specforge"):
        if peer in config.peers:
            drafts += train_peer(peer, config, model, data, w, stats)

    evals = {}
    for d in drafts:
        if d.directory is None:
            continue
        out = w / "evals" / d.name
        if d.name in config.redo and out.exists():
            shutil.rmtree(out)
        try:
            step(f"evaluate {d.name} in vLLM on {config.eval_prompts} held-out prompts (k={config.k})", "eval",
                 "--target", str(model), "--draft", str(d.directory), "--prompts", str(eval_prompts),
                 "--out", str(out), "--k", str(config.k),
                 "--max-tokens", str(config.eval_max_tokens or config.max_tokens),
                 done=out / "eval.json")
            evals[d.name] = json.loads((out / "eval.json").read_text())
        except subprocess.CalledProcessError as e:
            d.error = f"specmill eval failed (exit {e.returncode}); see {out}"

    results = summarize(config, stats, drafts, evals, step.timings, time.monotonic() - started)
    atomic_write_bytes(w / "peers.json", (json.dumps(results, indent=1) + "\n").encode())
    results["chart"] = str(plot(results, w / "peers.png"))
    atomic_write_bytes(w / "peers.json", (json.dumps(results, indent=1) + "\n").encode())
    print(format_table(results))
    return results


def data_stats(data: Path, config: PeersConfig) -> dict:
    from shared.shards import Dataset

    ds = Dataset(data)
    tokens = int(ds.lengths().sum())
    distinct = len(ds.manifest.token_counts)
    return {"samples": len(ds), "tokens": tokens,
            "loss_tokens": int(sum(ds.manifest.token_counts.values())), "distinct_loss_ids": distinct,
            "draft_vocab": min(DEFAULT_DRAFT_VOCAB, distinct),  # specmill's default, capped at the data
            "specmill_steps": math.ceil(config.epochs * tokens / config.token_budget),
            "aux_layer_ids": list(ds.manifest.header.aux_layer_ids),
            "aux_layer_convention": ds.manifest.header.aux_layer_convention,
            "last_hidden_state": ds.manifest.header.last_hidden_state}


# --------------------------------------------------------------------------- specmill


def train_specmill(config: PeersConfig, step: Steps, model: Path, data: Path, w: Path, stats: dict) -> Draft:
    run, out = w / "train" / "specmill", w / "drafts" / "specmill"
    settings = {"steps": stats["specmill_steps"], "lr": config.lr, "token_budget": config.token_budget,
                "ttt_steps": config.ttt_steps, "draft_vocab": stats["draft_vocab"], "optimizer": "AdamW (cosine)",
                "step_decay": 0.8, "mask": "predicted token generated (mask[t+2])"}
    d = Draft(name="specmill", trainer="specmill", recipe="specmill", settings=settings)
    timed = run / "train-seconds.json"  # the training's own time, kept for a resumed bench
    t0 = time.monotonic()
    step(f"specmill: train {stats['specmill_steps']} steps ({config.epochs} epochs)", "train", "--data", str(data),
         "--target", str(model), "--out", str(run), "--steps", str(stats["specmill_steps"]), "--lr", str(config.lr),
         "--token-budget", str(config.token_budget), "--ttt-steps", str(config.ttt_steps), "--log-every", "50",
         "--no-progress", done=timed)
    if not timed.is_file():
        _write_json(timed, {"train_seconds": round(time.monotonic() - t0, 1)})
    # --no-check: every peer's draft is served in vLLM in full later, and a check's server start
    # would count in specmill's training time here
    step("specmill: export (EAGLE format)", "export", str(run), "--format", "eagle", "--out", str(out), "--no-check",
         done=out / "config.json")
    d.train_seconds, d.directory = json.loads(timed.read_text())["train_seconds"], out
    return d


# --------------------------------------------------------------------------- peers


def train_peer(peer: str, config: PeersConfig, model: Path, data: Path, w: Path, stats: dict) -> list[Draft]:
    from trainer.bench.peers.venvs import ensure_venv

    drafts = [Draft(name=f"{peer}-{r}", trainer=peer, recipe=r) for r in config.recipes]
    try:
        python = ensure_venv(peer)
    except subprocess.CalledProcessError as e:
        for d in drafts:
            d.error = f"venv install failed: {' '.join(map(str, e.cmd))}: {_tail(e.output)}"
        return drafts
    train = {"speculators": train_speculators, "specforge": train_specforge}[peer]
    for d in drafts:
        out = w / "drafts" / d.name
        if d.name in config.redo and out.exists():
            shutil.rmtree(out)
        outcome = w / "train" / d.name / "outcome.json"
        trained_before = (out / "config.json").is_file() and outcome.is_file()
        t0 = time.monotonic()
        try:
            d.settings = train(d.recipe, config, python, model, data, w, stats, out)
            d.directory = out
        except (subprocess.CalledProcessError, RuntimeError, ValueError, FileNotFoundError) as e:
            d.error = f"{type(e).__name__}: {e}" + (f"\n{_tail(e.output)}" if getattr(e, "output", None) else "")
            log.error("%s: %s", d.name, d.error)
        # a draft trained by an earlier run of the bench keeps that run's training time
        d.train_seconds = (json.loads(outcome.read_text())["train_seconds"] if trained_before
                           else round(time.monotonic() - t0, 1))
        _write_json(outcome, asdict(d) | {"directory": str(d.directory)})
    return drafts


def converted(peer: str, alignment: str, data: Path, w: Path, model: Path) -> Path:
    """The data set in `peer`'s format (made once; the matched copy shares speculators' states)."""
    import torch

    from trainer.bench.peers import convert

    # SpecForge feeds the stored states to its draft as they are: they are stored in the dtype
    # the draft computes in (float32 an exact widening of the shards' bf16)
    dtype = compute_dtype()
    out = w / "peer-data" / (f"{peer}-{alignment}" + (f"-{dtype}" if peer == "specforge" else ""))
    if (out / "specmill-conversion.json").is_file():
        return out
    log.info("convert the shards for %s (%s loss mask)", peer, alignment)
    if peer == "speculators":
        native = w / "peer-data" / "speculators-native"
        share = native if alignment != "native" and (native / "specmill-conversion.json").is_file() else None
        convert.to_speculators(data, out, alignment=alignment, hidden_states_from=share)
    else:
        convert.to_specforge(data, out, target=model, alignment=alignment, dtype=getattr(torch, dtype))
    return out


def specmill_vocab(data: Path, stats: dict, out: Path) -> tuple[Path, Path]:
    """specmill's draft vocab (the same ids its run trains) as d2t/t2d .npy files."""
    import numpy as np

    from shared.shards import Dataset
    from trainer.vocab import build_vocab

    ds = Dataset(data)
    vocab = build_vocab(ds.manifest.token_counts, target_vocab_size=ds.manifest.header.target.vocab_size,
                        draft_vocab_size=stats["draft_vocab"])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "d2t.npy", vocab.d2t.numpy())
    np.save(out / "t2d.npy", vocab.t2d.numpy())
    return out / "d2t.npy", out / "t2d.npy"


def train_speculators(recipe: str, config: PeersConfig, python: Path, model: Path, data: Path, w: Path,
                      stats: dict, out: Path) -> dict:
    alignment = "native" if recipe == "defaults" else "specmill"
    peer_data = converted("speculators", alignment, data, w, model)
    run = w / "train" / f"speculators-{recipe}"
    args = ["--verifier-name-or-path", str(model), "--data-path", str(peer_data), "--save-path", str(run / "ckpt"),
            "--log-dir", str(run / "logs"), "--speculator-type", "eagle3", "--epochs", str(config.epochs),
            "--target-layer-ids", *map(str, _vllm_ids(stats)),
            # CPU needs (not maths): no flex-attention mask, no Triton loss, no 12 worker processes
            "--draft-attn-impl", "sdpa", "--loss-implementation", "eager", "--num-workers", "0",
            # its own precision option, set as specmill's --precision auto resolves here
            "--hidden-states-dtype", compute_dtype()]
    settings = {"epochs": config.epochs, "optimizer": "Muon lr 1e-3 (+AdamW), linear", "mask": alignment,
                "dtype": compute_dtype()}
    if recipe == "defaults":
        args += ["--draft-vocab-size", str(DEFAULT_DRAFT_VOCAB)]
        settings |= {"draft_vocab": DEFAULT_DRAFT_VOCAB, "ttt_steps": 3, "total_seq_len": 8192, "val_split": 0.1}
    else:
        d2t, t2d = specmill_vocab(data, stats, run / "vocab")
        args += ["--draft-vocab-size", str(stats["draft_vocab"]), "--d2t-path", str(d2t), "--t2d-path", str(t2d),
                 "--ttt-steps", str(config.ttt_steps), "--total-seq-len", str(config.token_budget),
                 # speculators refuses 1.0; the smallest split it allows
                 "--train-data-ratio", "0.99"]
        settings |= {"draft_vocab": stats["draft_vocab"], "ttt_steps": config.ttt_steps,
                     "total_seq_len": config.token_budget, "val_split": 0.01}
    if not (out / "config.json").is_file():
        try:
            _peer_run([str(python), str(SHIMS / "speculators_cpu.py"), *args], run / "train.log",
                      limit_s=config.peer_limit_s)
            last = run / "ckpt" / str(config.epochs - 1)  # the last epoch's checkpoint is the draft
        except PeerStopped as e:
            last = run / "ckpt" / "interrupted"  # speculators saves one on SIGTERM
            (run / "stopped.txt").write_text(f"{e}\n")
        if not (last / "config.json").is_file():
            raise RuntimeError(f"speculators left no checkpoint in {last}; see {run / 'train.log'}")
        # speculators' own format (Eagle3Speculator config), which vLLM reads
        shutil.copytree(last, out, ignore=shutil.ignore_patterns("optimizer_state_dict.pt", "scheduler_state_dict.pt"))
    if (run / "stopped.txt").is_file():
        settings["stopped"] = (run / "stopped.txt").read_text().strip()
    return settings


def train_specforge(recipe: str, config: PeersConfig, python: Path, model: Path, data: Path, w: Path,
                    stats: dict, out: Path) -> dict:
    from trainer.bench.peers.convert import target_view

    alignment = "native" if recipe == "defaults" else "specmill"
    peer_data = converted("specforge", alignment, data, w, model)
    run = w / "train" / f"specforge-{recipe}"
    view = target_view(model, w / "peer-data" / "target-view")
    tied = json.loads((model / "config.json").read_text()).get("tie_word_embeddings", False)
    cfg = {
        "model": {"target_model_path": str(view),
                  # a tied target has no lm_head.weight: its head is the embedding
                  "lm_head_key": "model.embed_tokens.weight" if tied else "lm_head.weight",
                  # its own precision option, set as specmill's --precision auto resolves here (the
                  # draft's weights and compute; its target head stays bf16, as SpecForge fixes it)
                  "torch_dtype": compute_dtype()},
        "data": {"hidden_states_path": str(peer_data), "cache_dir": str(run / "cache"),
                 "dataloader_num_workers": 0},
        "training": {"num_epochs": config.epochs, "log_interval": 10,
                     "save_interval": SPECFORGE_SAVE_INTERVAL,
                     # CPU needs (not maths): sdpa instead of flex attention, DDP instead of sharding
                     "attention_backend": "sdpa", "fsdp_sharding": "NO_SHARD"},
        "output_dir": str(run / "out"),
    }
    settings = {"epochs": config.epochs, "optimizer": "AdamW lr 1e-4, cosine, warmup 1.5%", "batch": "1 sample",
                "mask": alignment, "dtype": compute_dtype()}
    vocab = None
    if recipe == "defaults":
        cfg["model"]["draft_model_config"] = str(specforge_draft_config(model, DEFAULT_DRAFT_VOCAB, run))
        settings |= {"draft_vocab": DEFAULT_DRAFT_VOCAB, "ttt_steps": 7, "step_weights": "0.8^i"}
    else:
        vocab = run / "vocab_mapping.pt"
        d2t, t2d = specmill_vocab(data, stats, run / "vocab")
        _specforge_vocab(d2t, t2d, vocab)
        cfg["model"] |= {"vocab_mapping_path": str(vocab),
                         "draft_model_config": str(specforge_draft_config(model, stats["draft_vocab"], run))}
        cfg["training"]["ttt_length"] = config.ttt_steps
        settings |= {"draft_vocab": stats["draft_vocab"], "ttt_steps": config.ttt_steps, "step_weights": "0.8^i"}
    if not (out / "config.json").is_file():
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps(cfg, indent=1))  # SpecForge reads YAML or JSON
        try:
            _peer_run([str(python), str(SHIMS / "specforge_cpu.py"), "train", "--config", str(run / "run.json")],
                      run / "train.log", limit_s=config.peer_limit_s)
        except PeerStopped as e:
            (run / "stopped.txt").write_text(f"{e}\n")
            if not any((run / "out").glob("*-latest")):
                raise RuntimeError(f"SpecForge saved no checkpoint before it was stopped ({e})") from None
        export_specforge(python, run, model, out, vocab)
    if (run / "stopped.txt").is_file():
        steps = sorted((run / "out").glob("*-step*"), key=lambda p: int(p.name.rsplit("step", 1)[1]))
        settings["stopped"] = (run / "stopped.txt").read_text().strip() + (f"; exported {steps[-1].name}" if steps else "")
    return settings


def _specforge_vocab(d2t: Path, t2d: Path, out: Path) -> None:
    import numpy as np
    import torch

    torch.save({"d2t": torch.from_numpy(np.load(d2t)), "t2d": torch.from_numpy(np.load(t2d))}, out)


def specforge_draft_config(model: Path, draft_vocab: int, run: Path) -> Path:
    """The draft config SpecForge derives from the target when given none (a one-layer Llama
    with the target's architecture fields), written out with `draft_vocab`: its checkpoints do
    not keep the config, and its export needs it."""
    target = json.loads((model / "config.json").read_text())
    target = target.get("text_config", target)
    fields = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "max_position_embeddings", "rms_norm_eps", "hidden_act", "initializer_range", "attention_bias",
              "attention_dropout", "head_dim", "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id",
              "pad_token_id", "sliding_window", "use_sliding_window", "max_window_layers")
    cfg = {k: target[k] for k in fields if target.get(k) is not None}
    if "rope_theta" not in cfg and "rope_theta" in (target.get("rope_parameters") or {}):
        cfg["rope_theta"] = target["rope_parameters"]["rope_theta"]  # transformers >= 5 nests it
    cfg |= {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
            "tie_word_embeddings": False, "use_cache": True, "draft_vocab_size": draft_vocab}
    cfg.setdefault("pad_token_id", 0)
    path = run / "draft-config.json"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def export_specforge(python: Path, run: Path, model: Path, out: Path, vocab: Path | None) -> None:
    """`specforge export --to hf` of the run's latest checkpoint, with the target's embedding."""
    if vocab is None:  # defaults: the mapping SpecForge built from the data and cached
        found = sorted((run / "cache" / "vocab_mapping").glob("*.pt"))
        vocab = found[-1] if found else None
    _peer_run([str(python), str(SHIMS / "specforge_cpu.py"), "export", "--to", "hf", "--checkpoint",
               str(run / "out"), "--draft-config", str(run / "draft-config.json"), "--output-dir", str(out),
               "--embedding-source", str(model), *(("--vocab-mapping", str(vocab)) if vocab else ())],
              run / "export.log")


class PeerStopped(RuntimeError):
    """A peer's training ran past the time limit and was stopped (SIGTERM, then SIGKILL)."""


def _peer_run(cmd: list[str], logfile: Path, *, limit_s: float | None = None) -> None:
    """Run a peer's command in its own process group, output to `logfile`. Past `limit_s` it gets
    SIGTERM (both peers then save what they have) and, 180 s later, SIGKILL: `PeerStopped`.
    A failure raises CalledProcessError carrying the log's tail."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log.info("run: %s (log %s)", " ".join(cmd), logfile)
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise PeerStopped(f"stopped at the time limit ({limit_s:.0f} s, --peer-limit); log {logfile}") from None
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd, output=logfile.read_text(errors="replace"))


def compute_dtype() -> str:
    """The dtype every trainer computes in here: what specmill's `--precision auto` picks (bf16
    on a GPU or a CPU with native bf16, else fp32), given to each peer through its own option, so
    no trainer is slowed by emulated bf16 or favoured by lower precision."""
    from shared.hardware import local_device, resolve_model_dtype

    return resolve_model_dtype("auto", local_device())


def _vllm_ids(stats: dict) -> list[int]:
    shift = {"residual_entering_layer": 0, "layer_output": 1}[stats["aux_layer_convention"]]
    return [i + shift for i in stats["aux_layer_ids"]]


def _tail(text: str | None, lines: int = 12) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


# --------------------------------------------------------------------------- report


_KEYS = ("acceptance_length", "tokens_per_forward", "acceptance_per_position", "output_tokens_per_s", "speedup")


def summarize(config: PeersConfig, stats: dict, drafts: list[Draft], evals: dict, timings: list, seconds: float) -> dict:
    baseline = next(iter(evals.values()), None)
    rows = []
    for d in drafts:
        ev = evals.get(d.name)
        rows.append({"name": d.name, "trainer": d.trainer, "recipe": d.recipe, "settings": d.settings,
                     "train_seconds": d.train_seconds, "error": d.error,
                     "draft": None if d.directory is None else str(d.directory),
                     "eagle3": None if ev is None else {k: ev["ways"]["eagle3"][k] for k in _KEYS}})
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "data": stats, "drafts": rows,
        # none and n-gram: from the first evaluation (every evaluation serves the same prompts)
        "baselines": None if baseline is None else {w: {k: baseline["ways"][w][k] for k in _KEYS}
                                                    for w in ("none", "ngram")},
        "seconds": {title: round(s, 1) for title, s in timings} | {"total": round(seconds, 1)},
    }


def format_table(r: dict) -> str:
    d = r["data"]
    lines = ["", "specmill bench peers", "",
             f"  data: {d['samples']} samples, {d['tokens']} tokens ({d['loss_tokens']} trained, "
             f"{d['distinct_loss_ids']} distinct ids); {r['config']['epochs']} epochs for every trainer; "
             f"eval: {r['config']['eval_prompts']} evals prompts, k={r['config']['k']}", "",
             f"  {'draft':<32} {'accept len':>10} {'tok/fwd':>8} {'per position':>18} {'tok/s':>7} {'speedup':>8} "
             f"{'train s':>8}"]

    def row(name, m, train_s=None):
        al = "-" if m["acceptance_length"] is None else f"{m['acceptance_length']:.3f}"
        tpf = "-" if m["tokens_per_forward"] is None else f"{m['tokens_per_forward']:.3f}"
        pos = " ".join(f"{a:.2f}" for a in m["acceptance_per_position"]) or "-"
        ts = "" if train_s is None else f"{train_s:.0f}"
        return (f"  {name:<32} {al:>10} {tpf:>8} {pos:>18} {m['output_tokens_per_s']:>7.1f} {m['speedup']:>7.2f}x "
                f"{ts:>8}")

    for way, m in (r["baselines"] or {}).items():
        lines.append(row(f"({way})", m))
    for x in r["drafts"]:
        if x["eagle3"] is not None:
            stopped = x["settings"].get("stopped")
            lines.append(row(x["name"] + (" (stopped)" if stopped else ""), x["eagle3"], x["train_seconds"]))
            if stopped:
                lines.append(f"  {'':<32} {stopped}")
        else:
            lines.append(f"  {x['name']:<32} did not run: {(x['error'] or '?').splitlines()[0][:200]}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> Path:
    """Tokens per target forward of every way (the fair comparison with n-gram, whose drafts
    cost nothing), each draft's acceptance length written on its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values, labels, colors = [], [], [], []
    for way, m in (r["baselines"] or {}).items():
        names.append(way), values.append(m["tokens_per_forward"]), colors.append("grey")
        labels.append(f"{m['tokens_per_forward']:.3f}")
    palette = {"specmill": "tab:blue", "speculators": "tab:orange", "specforge": "tab:green"}
    for x in r["drafts"]:
        m = x["eagle3"]
        names.append(x["name"] + ("\n(stopped)" if x["settings"].get("stopped") else ""))
        values.append(0.0 if m is None else m["tokens_per_forward"])
        labels.append("not run" if m is None else f"{m['tokens_per_forward']:.3f}\nAL {m['acceptance_length']:.3f}")
        colors.append(palette[x["trainer"]])
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.2))
    bars = ax.bar(names, values, color=colors)
    for b, v, text in zip(bars, values, labels):
        ax.text(b.get_x() + b.get_width() / 2, v, text, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens per target forward (vLLM)")
    ax.set_ylim(0, max(values + [1.0]) * 1.2)
    ax.set_title(f"bench peers: {r['data']['samples']} samples, {r['config']['epochs']} epochs, "
                 f"k={r['config']['k']}, held-out evals prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    def names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    p.add_argument("--workdir", type=Path, default=PeersConfig.workdir, help="where artifacts go (resumes)")
    for name, kind, text in (
            ("samples", int, "training conversations (default sized for 2 shared cores)"),
            ("source", str, "training prompt package: sharegpt, chitchat or alpaca"),
            ("eval_prompts", int, "held-out evaluation prompts (from the evals package)"),
            ("max_tokens", int, "tokens per resampled answer"),
            ("epochs", int, "passes over the data set, for every trainer"),
            ("token_budget", int, "specmill's tokens per batch (and the matched peers')"),
            ("ttt_steps", int, "specmill's TTT unroll (and the matched peers')"),
            ("lr", float, "specmill's peak learning rate"),
            ("k", int, "speculative tokens in the evaluation")):
        default = PeersConfig.__dataclass_fields__[name].default
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument("--eval-max-tokens", type=int, default=None, metavar="N",
                   help="tokens per evaluated answer (default: --max-tokens)")
    p.add_argument("--peer-limit", dest="peer_limit_s", type=float, default=None, metavar="SECONDS",
                   help="stop a peer's training after this many seconds and evaluate its last checkpoint, marked "
                        "as stopped (default: no limit)")
    p.add_argument("--peers", type=names, default=PEERS, help=f"subset of {','.join(PEERS)} (default all)")
    p.add_argument("--recipes", type=names, default=RECIPES, help=f"subset of {','.join(RECIPES)} (default both)")
    p.add_argument("--redo", type=names, default=(), help="drafts to train and evaluate again, e.g. specforge-matched")


def run_cli(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in PeersConfig.__dataclass_fields__}
    results = run_peers(PeersConfig(**given))
    return 0 if all(x["error"] is None for x in results["drafts"]) else 1
