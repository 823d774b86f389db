"""`specmill export --check`: serve the draft just written on its target, and measure it.

After `export` has written DIR, the check

  1. reads DIR back against the checkpoint (`inspect_export`): every tensor of the layout, with
     its shape and the checkpoint's values (cast to the export's dtype); no weight all zeros or
     non-finite; d2t a one-to-one map into the target vocab that agrees with t2d; config.json's
     sizes and aux layer ids those the draft was trained with, in each engine's numbering;
  2. starts an engine on the target with the draft (vLLM where it is installed, else specmill's
     own loop, `eval --engine torch`), k draft tokens per round, greedy, on a handful of prompts:
     the prompt part of the run's held-out samples (token ids, as the data set holds them), or
     the rows of a `--check-prompts` file; and measures the acceptance length
         AL = 1 + accepted / drafts            (counted as `specmill eval` counts it)
  3. computes the trainer's simulated AL of the exported weights on those same samples (the
     validation figure, 1 + sum_j prod_{i<=j} acc_i, over the samples' recorded answers).

It fails when the engine cannot load or run the draft, when AL <= 1.05 (chance: next to no
draft token accepted) or when step 1 finds a problem. The message names what is wrong and,
where the figures tell, the likely cause. DIR stays as written; DIR/check.json holds the
result, DIR/check/ the prompts sent and the engine's log.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.storage import atomic_write_bytes
from trainer.checkpoint import read_meta, resolve_checkpoint
from trainer.run_layout import STATE_FILE

if TYPE_CHECKING:
    import torch

    from trainer.model import DraftArch

# torch and the modules that import it are imported where used: `specmill` reads CheckConfig's
# defaults for its flags, and starting any `specmill` command should not pay for torch.

log = logging.getLogger("specmill.trainer")

CHANCE_AL = 1.05  # at or below: next to no draft token accepted
ENGINES = ("vllm", "torch")
CHECK_FILE, CHECK_DIR = "check.json", "check"


def default_engine() -> str:
    """vLLM where it is installed, else specmill's torch loop."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "torch"


@dataclass(kw_only=True, slots=True)
class CheckConfig:
    """The check's settings (`specmill export --check-*`)."""

    engine: str | None = None  # None: default_engine()
    prompts: Path | None = None  # JSONL as `specmill eval` reads it; None: the run's held-out samples
    num_prompts: int = 4
    max_tokens: int = 32
    k: int | None = None  # draft tokens per round; None: the run's TTT steps
    target: Path | None = None  # None: the run's target path (meta.json)
    max_model_len: int = 2048  # prompts longer than this less max_tokens are passed over

    def __post_init__(self) -> None:
        self.engine = self.engine or default_engine()
        if self.engine not in ENGINES:
            raise ValueError(f"--check-engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("num_prompts", "max_tokens", "k", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--check-{name.replace('_', '-')} must be positive, got {value}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ValueError(f"--check-prompts must be a JSONL file, got {self.prompts}")


@dataclass(kw_only=True, slots=True)
class CheckResult:
    """What the check found; written as DIR/check.json."""

    passed: bool
    message: str  # what is wrong, or what was measured
    engine: str
    k: int
    prompts: str  # where the prompts came from
    num_prompts: int
    max_tokens: int
    acceptance_length: float | None = None
    acceptance_per_position: list[float] = field(default_factory=list)
    drafts: float = 0.0
    simulated_acceptance_length: float | None = None
    simulated_on: str = ""  # what the simulated figure was computed on, or why there is none
    problems: list[str] = field(default_factory=list)  # found in the files (step 1)
    engine_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_export(draft: Path, checkpoint: Path, config: CheckConfig) -> CheckResult:
    """Check the export in `draft` of `checkpoint` (a checkpoint or a run directory); writes
    draft/check.json and returns the result (a failed check is a result, not an exception)."""
    draft, path = Path(draft), resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    k = config.k or meta["config"]["ttt"]["steps"]
    target = Path(config.target or meta["target_path"])
    if not (target / "config.json").is_file():
        raise ValueError(f"the check needs the target the draft was trained for, and {target} is not a model "
                         "directory: pass --check-target DIR (or --no-check)")
    from trainer.evaluate import has_tokenizer, is_token_ids

    if config.engine == "vllm" and not has_tokenizer(target):
        raise ValueError(f"{target} has no tokenizer, which a vLLM server needs: --check-engine torch checks "
                         "without one")
    work = draft / CHECK_DIR
    work.mkdir(exist_ok=True)
    problems = inspect_export(draft, path)
    prompts, samples, source = _prompts(meta, config)
    prompts_file = work / "prompts.jsonl"  # what was sent, in the rows `specmill eval --prompts` reads
    atomic_write_bytes(prompts_file, "".join(json.dumps({"prompt_token_ids": p} if is_token_ids(p)
                                                        else {"messages": p}) + "\n" for p in prompts).encode())
    result = CheckResult(passed=False, message="", engine=config.engine, k=k, prompts=source,
                         num_prompts=len(prompts), max_tokens=config.max_tokens, problems=problems)
    log.info("check: %s engine, k=%d, %d prompts (%s), %d tokens each", config.engine, k, len(prompts), source,
             config.max_tokens)
    _measure(result, draft, target, prompts_file, config)
    result.simulated_acceptance_length, result.simulated_on = _simulate(draft, meta, target, samples, k) \
        if samples is not None else (None, "none: the prompts come from --check-prompts, whose answers the trainer "
                                           "never saw (the run's own figure is in config.json's specmill section)")
    result.passed, result.message = _verdict(result)
    atomic_write_bytes(draft / CHECK_FILE, json.dumps(result.to_dict(), indent=1).encode())
    return result


# --- 1. the files against the checkpoint -------------------------------------------------------


def inspect_export(draft: Path, checkpoint: Path) -> list[str]:
    """What is wrong with the export in `draft` of the checkpoint `checkpoint`, in words (empty: nothing)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from trainer.export import EAGLE_LAYER, SPECULATORS_LAYER, tensor_shapes
    from trainer.model import DraftArch

    meta = read_meta(checkpoint)
    arch = DraftArch(**meta["arch"])
    try:
        config = json.loads((draft / "config.json").read_text())
        with safe_open(str(draft / "model.safetensors"), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        return [f"the export cannot be read: {e}"]
    speculators = "speculators_config" in config
    layer = SPECULATORS_LAYER if speculators else EAGLE_LAYER
    shapes = {name.replace(EAGLE_LAYER, layer, 1): shape for name, shape in tensor_shapes(arch).items()}
    problems = [f"model.safetensors lacks {name}{_MISSING_EFFECT.get(name, '')}" for name in shapes
                if name not in tensors]
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        problems.append(f"model.safetensors has tensors the layout has not: {extra} (vLLM refuses unknown names; "
                        "SGLang skips them without a word)")
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)["model"]
    for name, t in tensors.items():
        if name not in shapes:
            continue
        if tuple(t.shape) != shapes[name]:
            problems.append(f"{name} has shape {tuple(t.shape)}, the draft's is {shapes[name]}")
            continue
        if t.is_floating_point() and not torch.isfinite(t).all():
            problems.append(f"{name} holds NaN or infinite values")
        elif t.is_floating_point() and not t.any():
            problems.append(f"{name} is all zeros{_ZERO_EFFECT.get(name, '')}")
        trained = state[name.replace(layer, EAGLE_LAYER, 1)]
        if not torch.equal(t, trained.to(t.dtype)):
            problems.append(f"{name} differs from the checkpoint's ({checkpoint.name})")
    if "d2t" in tensors and "t2d" in tensors and tensors["d2t"].shape == shapes["d2t"]:
        problems += _vocab_map_problems(tensors["d2t"], tensors["t2d"], arch.vocab_size)
    return problems + _config_problems(config, speculators, arch, meta)


_MISSING_EFFECT = {
    "d2t": " (vLLM then leaves draft id i as target id i, and SGLang its hot tokens unset, without a word)",
    "fc.weight": " (vLLM and SGLang leave fc at its initial values without a word)",
}
_ZERO_EFFECT = {"fc.weight": " (the draft then ignores the target's hidden states)"}


def _vocab_map_problems(d2t: torch.Tensor, t2d: torch.Tensor, vocab_size: int) -> list[str]:
    """d2t: draft id i -> target id i + d2t[i], one-to-one into [0, V); t2d marks those ids."""
    import torch

    ids = torch.arange(len(d2t)) + d2t.long()
    if ids.min() < 0 or ids.max() >= vocab_size:
        return [f"d2t maps draft ids to target ids outside [0, {vocab_size})"]
    problems = []
    if len(ids.unique()) != len(ids):
        problems.append("d2t maps two draft ids to the same target id")
    if not torch.equal(t2d.nonzero().flatten(), ids.sort().values):
        problems.append("t2d does not mark the target ids d2t maps to")
    return problems


def _config_problems(config: dict[str, Any], speculators: bool, arch: DraftArch, meta: dict[str, Any]) -> list[str]:
    from trainer.export import served_aux_layer_ids, vllm_aux_layer_ids
    from trainer.model import DraftArch

    layer = config.get("transformer_layer_config", {}) if speculators else config
    # sizes from the layer config; the vocab size and the EAGLE 3.1 norm flags from the top level (both layouts)
    top = ("draft_vocab_size", "norm_before_fc", "norm_output")
    read = {**{k: layer.get(k) for k in DraftArch.__slots__}, **{k: config.get(k) for k in top}}
    problems = [f"config.json has {name} = {read[name]!r}, the draft's is {want!r}"
                for name, want in arch.to_dict().items() if read[name] != want]
    trained = vllm_aux_layer_ids(meta["aux_layer_ids"], meta["aux_layer_convention"])
    served = served_aux_layer_ids(config)
    if served != trained:
        problems.append(f"config.json's aux layer ids {served} (eagle_aux_hidden_state_layer_ids, vLLM's numbering) "
                        f"are not the layers the draft was trained on, {trained}: vLLM would feed fc the hidden "
                        "states of other layers")
    sglang = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if not speculators and sglang != [i - 1 for i in trained]:
        problems.append(f"config.json's eagle_config aux layer ids {sglang} are not the layers the draft was "
                        f"trained on in SGLang's numbering (layer outputs), {[i - 1 for i in trained]}")
    if config.get("norm_before_residual") is not False:  # vLLM defaults it to true for speculators configs
        problems.append(f"config.json's norm_before_residual is {config.get('norm_before_residual')!r}; this draft "
                        "needs false, written")
    return problems


# --- 2. the engine -----------------------------------------------------------------------------


def _prompts(meta: dict[str, Any], config: CheckConfig) -> tuple[list[Any], np.ndarray | None, str]:
    """(prompts, the data set samples they were cut from or None, where they come from)."""
    from trainer.evaluate import load_prompts

    if config.prompts is not None:
        prompts = load_prompts(config.prompts)[:config.num_prompts]
        return prompts, None, f"the first {len(prompts)} rows of {config.prompts}"
    ds, indices, kind = _held_out(meta)
    chosen, prompts = [], []
    for i in indices:
        sample = ds[int(i)]
        answer = np.flatnonzero(np.asarray(sample["loss_mask"]))  # the first learned token ends the prompt
        if len(answer) and 0 < answer[0] <= config.max_model_len - config.max_tokens:
            chosen.append(int(i))
            prompts.append([int(t) for t in np.asarray(sample["input_ids"][:answer[0]])])
        if len(prompts) == config.num_prompts:
            break
    if not prompts:
        raise ValueError(f"none of the run's {kind} in {meta['dataset_path']} has a prompt that fits "
                         f"{config.max_model_len} tokens with {config.max_tokens} to generate; pass --check-prompts")
    return prompts, np.asarray(chosen), f"prompts of {len(prompts)} {kind} of the run's data set"


def _held_out(meta: dict[str, Any]) -> tuple[Any, np.ndarray, str]:
    """The run's data set and its validation samples in order (or, with none held out, its first
    training samples), as `train` split them."""
    from shared.manifest import ManifestError
    from shared.shards import Dataset
    from trainer.config import DataConfig
    from trainer.data import dataset_fingerprint, left_out, split_validation

    data = DataConfig(**meta["config"]["data"])
    try:
        ds = Dataset(data.path)
    except (ManifestError, FileNotFoundError):
        raise ValueError(f"the check takes its prompts from the run's data set, and {data.path} is not there: "
                         "pass --check-prompts FILE (or --no-check)") from None
    if dataset_fingerprint(ds) != meta["dataset_fingerprint"]:
        raise ValueError(f"{data.path} is not the data set the draft was trained on (its fingerprint differs), so "
                         "its held-out split is not the run's: pass --check-prompts FILE (or --no-check)")
    excluded = left_out(ds, data)
    if data.val_samples:
        return ds, split_validation(ds, seed=meta["config"]["seed"], val_samples=data.val_samples,
                                    exclude=excluded), "held-out samples"
    rest = np.setdiff1d(np.arange(len(ds)), excluded)
    return ds, rest, "TRAINING samples (the run held none out)"


def _measure(result: CheckResult, draft: Path, target: Path, prompts_file: Path, config: CheckConfig) -> None:
    """Serve the draft (way eagle3 of `specmill eval`) and fill in the acceptance figures, or the error."""
    from trainer.engine import EngineError
    from trainer.evaluate import EvalConfig, load_prompts, run_way, run_ways

    eval_config = EvalConfig(target=target, draft=draft, prompts=prompts_file, out=draft / CHECK_DIR, k=result.k,
                             max_tokens=config.max_tokens, engine=config.engine, max_model_len=config.max_model_len,
                             concurrency=min(4, result.num_prompts), progress=False)
    prompts = load_prompts(prompts_file)
    failures: tuple[type[BaseException], ...] = (EngineError, RuntimeError, ValueError, KeyError, OSError)
    if config.engine == "vllm":
        import httpx

        failures += (httpx.HTTPError,)
    try:
        run = run_way("eagle3", eval_config, prompts) if config.engine == "vllm" else \
            run_ways(eval_config, prompts, ("eagle3",))["eagle3"]
    except failures as e:
        result.engine_error = f"{type(e).__name__}: {e}"
        return
    result.drafts = run.drafts
    if run.drafts:
        result.acceptance_length = 1 + run.accepted / run.drafts
        result.acceptance_per_position = [run.accepted_per_pos.get(p, 0.0) / run.drafts for p in range(result.k)]


# --- 3. the trainer's figure on the same samples ------------------------------------------------


def _simulate(draft: Path, meta: dict[str, Any], target: Path, samples: np.ndarray, k: int) -> tuple[float | None, str]:
    """The trainer's simulated AL of the exported weights on `samples` (their recorded answers)."""
    import torch

    from shared.shards import Dataset
    from trainer.config import DataConfig, TTTConfig
    from trainer.data import validation_batches
    from trainer.export import load_exported
    from trainer.target import TargetArch, TargetHead, load_target_weights
    from trainer.train import evaluate

    try:
        model = load_exported(draft, dtype=torch.float32)
    except (KeyError, RuntimeError, ValueError, TypeError, OSError) as e:
        return None, f"none: the trainer cannot load the export either ({type(e).__name__}: {str(e)[:300]})"
    target_arch = TargetArch.from_config_json(target)
    weights = load_target_weights(target, target_arch, dtype=torch.float32)
    model.attach_target_embedding(weights.embed)
    head = TargetHead(weights, eps=target_arch.rms_norm_eps, pre_norm=meta["last_hidden_state"] == "pre_norm")
    data = DataConfig(**meta["config"]["data"])
    ttt = TTTConfig(steps=k, step_decay=meta["config"]["ttt"]["step_decay"])
    record = evaluate(model, head, validation_batches(Dataset(data.path), samples, data), ttt, torch.device("cpu"),
                      precision="fp32")
    return record["al"], f"the same {len(samples)} samples' recorded answers (k={k}, {int(sum(record['counted_tokens']))} " \
                         "scored predictions)"


def _verdict(r: CheckResult) -> tuple[bool, str]:
    sim = r.simulated_acceptance_length
    if r.engine_error is not None:
        what = f"the {r.engine} engine could not load or run the draft: {r.engine_error}"
    elif not r.drafts:
        what = f"the {r.engine} engine served the target but never drafted with the draft"
    elif r.acceptance_length <= CHANCE_AL:
        what = f"acceptance length {r.acceptance_length:.3f} in {r.engine} is at chance (<= {CHANCE_AL})"
        if sim is not None and not r.problems:
            what += (f"; the trainer's simulation of the same weights reaches {sim:.3f} on the same samples, so the "
                     "engine reads the export otherwise than the trainer (aux layer ids, norm flags, a tensor it "
                     "skips)") if sim > CHANCE_AL else \
                (f"; the trainer's simulation of the same weights is at chance too ({sim:.3f}): the draft itself "
                 "predicts nothing yet (too few training steps?)")
    else:
        what = None
    if r.problems:
        found = "; ".join(r.problems)
        what = f"the export's files are wrong: {found}" if what is None else f"{what}; likely cause, in the files: {found}"
    if what is not None:
        return False, what
    figure = "" if sim is None else f", {sim:.3f} simulated by the trainer on the same samples"
    return True, f"acceptance length {r.acceptance_length:.3f} in {r.engine} (k={r.k}){figure}"
