"""`specmill eval`: run the target three ways on the same prompts and compare.

    none    no speculation: the reference for greedy output and throughput
    ngram   vLLM's prompt-lookup proposer: the baseline that needs no training
    eagle3  the exported draft, k speculative tokens

Two engines. `--engine vllm`: each way gets its own vLLM server, started, used and stopped in
turn (one at a time: the CPU build pins every core and takes GBs); acceptance comes from the
server's counters, diffed around the measured requests. `--engine torch`: specmill's own
greedy speculative loop (spec_decode.py) on a transformers model, batch 1, counting the same
way; it serves targets the vLLM build cannot and cross-checks vLLM. Both report:

    AL                  = 1 + accepted / drafts        (tokens per draft round)
    tokens per forward  = completion / (completion - accepted)
                          (each target forward yields 1 token plus the drafts it accepted)
    acceptance at pos i = accepted_per_pos[i] / drafts

Greedy decoding must give the same text with or without speculation; bf16 kernels may
break exact equality now and then, so the agreeing fraction is reported, not enforced.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.hardware import local_device, resolve_model_dtype
from shared.manifest import default_aux_layer_ids
from trainer.engine import VllmEngine

if TYPE_CHECKING:
    from trainer.model import Eagle3Draft
    from trainer.spec_decode import Target

log = logging.getLogger("specmill.trainer")

WAYS = ("none", "ngram", "eagle3")
PROGRESS_EVERY_S = 10.0  # a line this often while a way generates
ENGINES = ("vllm", "torch")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# vllm auto: bfloat16 on GPUs and CPUs that do it natively, else float32 (shared.hardware);
# torch: exact greedy agreement on CPU.
DEFAULT_DTYPE = {"vllm": "auto", "torch": "float32"}
PROMPT_LOOKUP_MAX = 4  # the n-gram way's n (vLLM: prompt_lookup_min defaults to the max)
_METRIC = "vllm:spec_decode_num_{}_total"
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
# a Prometheus sample line: name, optional {labels}, value
_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)')
_WARMUP = [{"role": "user", "content": "Say hello."}]

# A prompt: chat messages (the engine renders them with the target's chat template) or token
# ids (sent as they are: prompts cut from a data set's samples, targets without a tokenizer).
Prompt = list[dict[str, str]] | list[int]


def is_token_ids(prompt: Prompt) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    target: Path
    draft: Path
    prompts: Path
    out: Path
    json_path: Path | None = None  # None: out/eval.json
    k: int = 3
    max_tokens: int = 64
    concurrency: int = 4
    dtype: str | None = None  # None: DEFAULT_DTYPE[engine]
    engine: str = "vllm"
    max_model_len: int = 2048
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE; the CPU build's default reserves far more
    request_timeout_s: float = 600.0
    progress: bool = True  # progress bars (torch engine)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES} (vllm: the vLLM server; torch: specmill's "
                             f"own PyTorch speculative loop), got {self.engine!r}")
        self.dtype = self.dtype or DEFAULT_DTYPE[self.engine]
        self.target, self.draft, self.prompts, self.out = map(Path, (self.target, self.draft, self.prompts, self.out))
        if not (self.target / "config.json").is_file():
            raise ValueError(f"--target must be a HF model directory with a config.json, got {self.target}")
        if not (self.draft / "config.json").is_file() or not (self.draft / "model.safetensors").is_file():
            raise ValueError(f"--draft must be an exported EAGLE-3 directory (config.json + model.safetensors; "
                             f"see `specmill export --format eagle`), got {self.draft}")
        if not self.prompts.is_file():
            raise ValueError(f"--prompts must be a JSONL file, got {self.prompts}")
        for name in ("k", "max_tokens", "concurrency", "max_model_len", "kv_cache_gib"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.dtype == "auto":
            self.dtype = resolve_model_dtype("auto", local_device())
        self.json_path = Path(self.json_path) if self.json_path else self.out / "eval.json"


@dataclass(slots=True)
class WayRun:
    """What one server gave: texts and token counts per prompt, counter deltas, wall time."""
    way: str
    texts: list[str]
    completion_tokens: list[int]
    seconds: float
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: dict[int, float] = field(default_factory=dict)
    target_forwards: int | None = None  # counted by the torch engine; vLLM does not expose it


def load_prompts(path: Path) -> list[Prompt]:
    """Each JSONL row's messages up to its first assistant turn (the leading system/user turns),
    or its `prompt_token_ids` (a row {"prompt_token_ids": [ids]}, vLLM's name for them)."""
    prompts: list[Prompt] = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and "prompt_token_ids" in row:
                prompts.append(_token_ids(row["prompt_token_ids"], f"{path}:{line_no}"))
                continue
            messages = row["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line_no}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}} "
                             f"or {{\"prompt_token_ids\": [ids]}} ({type(e).__name__}: {e})") from None
        lead = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise ValueError(f"{path}:{line_no}: messages[{i}] must have a role and a string content, got {m!r}")
            if m["role"] == "assistant":
                break
            lead.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "user" for m in lead):
            raise ValueError(f"{path}:{line_no}: no user turn before the first assistant turn")
        prompts.append(lead)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _token_ids(ids: Any, where: str) -> list[int]:
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in ids):
        raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of token ids (ints >= 0), got {ids!r}")
    return ids


def speculative_config(way: str, draft: Path, k: int) -> dict[str, Any] | None:
    if way == "none":
        return None
    if way == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": PROMPT_LOOKUP_MAX}
    if way == "eagle3":
        return {"method": "eagle3", "model": str(draft.resolve()), "num_speculative_tokens": k}
    raise ValueError(f"unknown way {way!r}; expected one of {WAYS}")


def parse_spec_metrics(text: str) -> dict[str, Any]:
    """Spec-decode counters from a /metrics page, summed over engines; absent counters read 0."""
    names = {_METRIC.format(n): n for n in ("drafts", "draft_tokens", "accepted_tokens")}
    totals = dict.fromkeys(names.values(), 0.0)
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        if not (m := _SAMPLE.match(line)):
            continue
        name, labels, value = m.groups()
        if name in names:
            totals[names[name]] += float(value)
        elif name == _PER_POS:
            pos = int(re.search(r'position="(\d+)"', labels or "").group(1))
            per_pos[pos] = per_pos.get(pos, 0.0) + float(value)
    return {**totals, "per_pos": per_pos}


def run_way(way: str, config: EvalConfig, prompts: list[Prompt]) -> WayRun:
    args = ["--dtype", config.dtype, "--enforce-eager", "--max-model-len", str(config.max_model_len)]
    if (spec := speculative_config(way, config.draft, config.k)) is not None:
        args += ["--speculative-config", json.dumps(spec)]
    engine = VllmEngine(config.target, args, log_path=config.out / f"vllm-{way}.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib)})
    import httpx

    with engine, httpx.Client(base_url=engine.base_url, timeout=config.request_timeout_s) as client:
        served = str(engine.model)  # the launcher serves the model under its path
        # the first request pays one-off costs that would skew tokens/s
        _request(client, served, prompts[0][:8] if is_token_ids(prompts[0]) else _WARMUP, 8)
        before = parse_spec_metrics(client.get("/metrics").text)
        started = time.perf_counter()
        with ThreadPoolExecutor(config.concurrency) as pool:
            futures = [pool.submit(_request, client, served, prompt, config.max_tokens) for prompt in prompts]
            while not wait(futures, timeout=PROGRESS_EVERY_S).done.issuperset(futures):
                done = sum(f.done() for f in futures)
                log.info("eval: %s: %d of %d answers after %.0f s", way, done, len(futures),
                         time.perf_counter() - started)
            answers = [f.result() for f in futures]
        seconds = time.perf_counter() - started
        after = parse_spec_metrics(client.get("/metrics").text)
    positions = sorted(set(after["per_pos"]) | set(before["per_pos"]))
    return WayRun(way=way, texts=[a[0] for a in answers], completion_tokens=[a[1] for a in answers], seconds=seconds,
                  drafts=after["drafts"] - before["drafts"],
                  draft_tokens=after["draft_tokens"] - before["draft_tokens"],
                  accepted=after["accepted_tokens"] - before["accepted_tokens"],
                  accepted_per_pos={p: after["per_pos"].get(p, 0.0) - before["per_pos"].get(p, 0.0)
                                    for p in positions})


def _request(client: Any, model: str, prompt: Prompt, max_tokens: int) -> tuple[str, int]:
    """One greedy completion: messages through the chat API, token ids through the completions API."""
    if is_token_ids(prompt):
        route, body = "/v1/completions", {"prompt": prompt}
    else:
        route, body = "/v1/chat/completions", {"messages": prompt}
    response = client.post(route, json={"model": model, **body, "temperature": 0.0, "max_tokens": max_tokens})
    if response.status_code != 200:
        raise RuntimeError(f"vLLM answered {response.status_code} to a request to {route}: {response.text[:500]}")
    choice = response.json()["choices"][0]
    text = choice["text"] if is_token_ids(prompt) else choice["message"]["content"]
    return text or "", int(response.json()["usage"]["completion_tokens"])


def summarize(run: WayRun, reference: WayRun | None) -> dict[str, Any]:
    completion = sum(run.completion_tokens)
    speculating = run.drafts > 0
    summary = {
        "drafts": run.drafts, "draft_tokens": run.draft_tokens, "accepted_tokens": run.accepted,
        "completion_tokens": completion, "seconds": run.seconds,
        "output_tokens_per_s": completion / run.seconds,
        "acceptance_length": 1 + run.accepted / run.drafts if speculating else None,
        # forwards = completion - accepted: each forward yields one token of its own plus the accepted drafts
        "tokens_per_forward": completion / (completion - run.accepted) if completion > run.accepted else None,
        "acceptance_per_position": ([run.accepted_per_pos.get(p, 0.0) / run.drafts
                                     for p in range(max(run.accepted_per_pos, default=-1) + 1)]
                                    if speculating else []),
        "texts": run.texts,
    }
    if run.target_forwards is not None:
        # counted, prefills included; above, the vLLM formula, which overstates a little when
        # EOS or max_tokens cut a round's accepted tokens (vLLM counts them as accepted)
        summary["target_forwards"] = run.target_forwards
        summary["tokens_per_forward_counted"] = completion / run.target_forwards
    if reference is not None:
        same = [a == b for a, b in zip(run.texts, reference.texts, strict=True)]
        summary["greedy_agreement"] = sum(same) / len(same)
        summary["differing_prompts"] = [i for i, s in enumerate(same) if not s]
    return summary


def simulated_acceptance_length(draft: Path) -> dict[str, Any]:
    """The trainer's simulated AL for this draft, if its export recorded one in config.json's specmill section."""
    section = json.loads((draft / "config.json").read_text()).get("specmill")
    if not isinstance(section, dict) or section.get("simulated_acceptance_length") is None:
        return {"available": False,
                "reason": "the export's config.json has no specmill.simulated_acceptance_length"}
    return {"available": True, "value": float(section["simulated_acceptance_length"]),
            **{k: section[k] for k in ("simulated_acceptance_length_split", "step", "ttt_steps") if k in section}}


# --- `--engine torch`: the loop of trainer/spec_decode.py on a transformers model -------------


def aux_layer_ids(draft_dir: Path, num_layers: int) -> tuple[int, ...]:
    """The aux layer ids vLLM reads from the export (export.served_aux_layer_ids), else vLLM's
    default (2, L//2, L-3)."""
    from trainer.export import served_aux_layer_ids

    ids = served_aux_layer_ids(json.loads((draft_dir / "config.json").read_text())) \
        or default_aux_layer_ids(num_layers)
    if len(ids) != 3 or not all(0 <= i < num_layers for i in ids):
        raise ValueError(f"{draft_dir}/config.json: eagle_aux_hidden_state_layer_ids {ids} must be 3 ids in "
                         f"[0, {num_layers}) for this {num_layers}-layer target")
    return tuple(int(i) for i in ids)


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                               "tokenizer.model"))


def load_engine(config: EvalConfig) -> tuple[Any, Target, Eagle3Draft, set[int]]:
    """tokenizer (None when the target directory has none: then prompts must be token ids),
    target, draft (sharing the target's embedding) and the EOS ids."""
    from transformers import AutoTokenizer

    from trainer.export import load_exported
    from trainer.spec_decode import TORCH_DTYPES, Target, load_target_model

    dtype = TORCH_DTYPES[config.dtype]
    tokenizer = AutoTokenizer.from_pretrained(config.target) if has_tokenizer(config.target) else None
    model = load_target_model(config.target, dtype)
    text = model.config.get_text_config()
    draft = load_exported(config.draft, dtype=dtype).eval()
    if (draft.arch.vocab_size, draft.arch.hidden_size) != (text.vocab_size, text.hidden_size):
        raise ValueError(f"--draft {config.draft} was built for vocab {draft.arch.vocab_size} / hidden "
                         f"{draft.arch.hidden_size}, the target has {text.vocab_size} / {text.hidden_size}")
    draft.attach_target_embedding(model.get_input_embeddings().weight)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return tokenizer, Target(model, aux_layer_ids(config.draft, text.num_hidden_layers)), draft, eos_ids


def run_ways(config: EvalConfig, prompts: list[Prompt], ways: tuple[str, ...]) -> dict[str, WayRun]:
    """Each way on every prompt in turn (batch 1), one model load for all ways. Without a
    tokenizer in the target directory the texts are the completions' token ids."""
    from tqdm import tqdm

    from trainer.spec_decode import EagleProposer, NgramProposer, NoProposer, SpecStats, generate

    tokenizer, target, draft, eos_ids = load_engine(config)
    if tokenizer is None and not all(map(is_token_ids, prompts)):
        raise ValueError(f"{config.target} has no tokenizer to render chat prompts with; give the prompts as "
                         "token ids ({\"prompt_token_ids\": [...]} rows)")
    prompt_ids = [p if is_token_ids(p) else
                  tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"]
                  for p in prompts]
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None \
        else (lambda ids: " ".join(map(str, ids)))
    proposers = {"none": NoProposer(), "ngram": NgramProposer(k=config.k, min_n=PROMPT_LOOKUP_MAX,
                                                              max_n=PROMPT_LOOKUP_MAX),
                 "eagle3": EagleProposer(draft, config.k)}
    runs = {}
    for way in ways:
        stats = SpecStats(k=config.k)
        generate(target, proposers[way], prompt_ids[0][:32], max_tokens=8, eos_ids=eos_ids,
                 stats=SpecStats(k=config.k))  # warm-up: first-call costs would skew tokens/s
        started, completions = time.perf_counter(), []
        for ids in tqdm(prompt_ids, desc=f"torch {way}", disable=not config.progress):
            completions.append(generate(target, proposers[way], ids, max_tokens=config.max_tokens,
                                        eos_ids=eos_ids, stats=stats))
        seconds = time.perf_counter() - started
        log.info("torch %s: %d tokens in %.1f s, %d target forwards", way, sum(map(len, completions)), seconds,
                 stats.forwards)
        runs[way] = WayRun(way=way, texts=[decode(c) for c in completions],
                           completion_tokens=[len(c) for c in completions], seconds=seconds,
                           drafts=stats.drafts, draft_tokens=stats.draft_tokens, accepted=stats.accepted,
                           accepted_per_pos=dict(enumerate(map(float, stats.accepted_per_pos))),
                           target_forwards=stats.forwards)
    return runs


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Serve the target three ways, write the JSON report and chart, return the report."""
    prompts = load_prompts(config.prompts)
    config.out.mkdir(parents=True, exist_ok=True)
    if config.engine == "torch":
        log.info("eval (torch): %s on %d prompts, batch 1, max_tokens %d", WAYS, len(prompts), config.max_tokens)
        runs = run_ways(config, prompts, WAYS)
    else:
        runs = {}
        for way in WAYS:
            log.info("eval: %s on %d prompts (max_tokens %d, concurrency %d)", way, len(prompts),
                     config.max_tokens, config.concurrency)
            runs[way] = run = run_way(way, config, prompts)
            completion = sum(run.completion_tokens)
            log.info("eval: %s done: %d tokens in %.1f s (%.1f tok/s)%s", way, completion, run.seconds,
                     completion / run.seconds,
                     f", acceptance length {1 + run.accepted / run.drafts:.2f}" if run.drafts else "")
    ways = {way: summarize(run, None if way == "none" else runs["none"]) for way, run in runs.items()}
    base = ways["none"]["output_tokens_per_s"]
    for summary in ways.values():
        summary["speedup"] = summary["output_tokens_per_s"] / base
    report = {
        "target": str(config.target), "draft": str(config.draft), "prompts": str(config.prompts),
        "num_prompts": len(prompts), "k": config.k, "max_tokens": config.max_tokens,
        "concurrency": 1 if config.engine == "torch" else config.concurrency,
        "batching": "sequential (batch 1)" if config.engine == "torch" or config.concurrency == 1 else
        f"up to {config.concurrency} requests in flight", "engine": config.engine, "dtype": config.dtype,
        "decoding": "greedy (temperature 0)",
        "simulated_acceptance_length": simulated_acceptance_length(config.draft),
        "ways": ways,
    }
    config.json_path.parent.mkdir(parents=True, exist_ok=True)
    config.json_path.write_text(json.dumps(report, indent=1))
    report["chart"] = str(plot_report(report, config.out / "eval.png"))
    return report


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Left: AL and tokens per forward per way; right: acceptance rate per draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = report["ways"]
    fig, (ax_al, ax_pos) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(ways)
    width = 0.38
    for offset, key, label in ((-width / 2, "acceptance_length", "acceptance length"),
                               (width / 2, "tokens_per_forward", "tokens per target forward")):
        values = [ways[n][key] for n in names]  # None: no drafts (no speculation), so no AL
        bars = ax_al.bar([i + offset for i in range(len(names))], [v or 0.0 for v in values], width, label=label)
        ax_al.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=8)
    ax_al.set_xticks(range(len(names)), [f"{n}\n{ways[n]['speedup']:.2f}x" for n in names])
    ax_al.set_title(f"per way (k={report['k']}; speedup under the name)")
    ax_al.legend(fontsize=8)
    for name in names:
        rates = ways[name]["acceptance_per_position"]
        if rates:
            ax_pos.plot(range(len(rates)), rates, "o-", label=name)
    ax_pos.set_xticks(range(report["k"]))
    ax_pos.set_xlabel("draft position")
    ax_pos.set_ylabel("accepted / drafts")
    ax_pos.set_ylim(0, 1.05)
    ax_pos.set_title("per-position acceptance")
    ax_pos.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
