"""Subcommands this package adds to `specmill` (see shared/cli.py): `train` and `export`.

Flags default to None and only the ones given override the config (TOML file, then the
dataclass defaults in trainer/config.py), so no default lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# flag -> (config field, type, help)
_TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--data": ("data.path", str, "shard data set directory, or a URI such as s3://bucket/data"),
    "--target": ("target.path", Path, "target model directory (HF config.json + safetensors)"),
    "--out": ("out", Path, "run directory (checkpoints, metrics.jsonl, curves.png); resumes if it has a checkpoint"),
    "--steps": ("steps", int, "optimizer steps"),
    "--seed": ("seed", int, "seed of the init, the data order and the validation split"),
    "--device": ("device", str, "auto, cpu or cuda"),
    "--precision": ("precision", str, "auto (bf16 autocast on a GPU or a CPU with AMX/AVX512-BF16, else fp32), fp32 or bf16"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--token-budget": ("data.token_budget", int, "tokens per packed batch"),
    "--max-seq-len": ("data.max_seq_len", int, "cut longer samples to this many tokens"),
    "--val-samples": ("data.val_samples", int, "samples held out for validation"),
    "--draft-vocab-size": ("draft.draft_vocab_size", int, "draft vocabulary size (top-N loss-masked ids)"),
    "--init": ("draft.init", Path, "start from this exported draft (warm start; its shape must be this run's)"),
    "--ttt-steps": ("ttt.steps", int, "training-time-test unroll length k"),
    "--log-every": ("log_every", int, "log every N steps"),
    "--eval-every": ("eval_every", int, "validate every N steps"),
    "--checkpoint-every": ("checkpoint.every", int, "save every N steps"),
    "--stop-after": ("stop_after", int, "save and exit after step N (resume later with the same command)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an EAGLE-3 draft on a shard data set",
                       description="Train an EAGLE-3 draft. Settings come from TRAIN.toml (optional), "
                                   "then the flags given; see trainer/config.py for every field.")
    p.add_argument("config", nargs="?", type=Path, default=None, help="TRAIN.toml")
    for flag, (dest, kind, text) in _TRAIN_FLAGS.items():
        p.add_argument(flag, dest=dest, type=kind, default=None, help=text,
                       metavar={Path: "DIR", int: "N", float: "X", str: "NAME"}[kind])
    p.add_argument("--temperatures", dest="data.temperatures", type=float, nargs="+", default=None, metavar="T",
                   help="train only on samples whose answers were generated at these temperatures (the shards' "
                        "temperature column), e.g. --temperatures 0 for a draft that will serve greedy decoding")
    p.add_argument("--set", dest="set", action="append", default=None, metavar="KEY=VALUE",
                   help="any config field, e.g. --set optim.warmup_fraction=0.05 (repeatable)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="export a trained draft for vLLM / SGLang")
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run's --out (its newest checkpoint)")
    p.add_argument("--format", choices=("eagle", "speculators"), required=True,
                   help="eagle: LlamaForCausalLMEagle3 (vLLM, SGLang); speculators: Eagle3Speculator "
                        "(vllm-project/speculators layout, which vLLM detects)")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the exported weights")
    p.add_argument("--verifier", type=Path, default=None,
                   help="speculators: the target model path the config names (default: the run's target path)")
    p.add_argument("--speculative-tokens", type=int, default=None,
                   help="speculators: draft length the config declares (default: the run's TTT steps)")
    from trainer.check import ENGINES as CHECK_ENGINES, CheckConfig

    check = {f.name: f.default for f in dataclasses.fields(CheckConfig) if f.default is not dataclasses.MISSING}
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="after writing, serve the draft on its target and fail (exit 1, files left in --out, "
                        "OUT/check.json) if the engine cannot load it, its acceptance length is at chance "
                        "(<= 1.05) or the files do not match the checkpoint (default: on)")
    p.add_argument("--check-engine", choices=CHECK_ENGINES, default=check["engine"],
                   help="vllm (the default where vLLM is installed) or torch (specmill's own loop, the default "
                        "elsewhere)")
    p.add_argument("--check-prompts", type=Path, default=check["prompts"], metavar="FILE",
                   help='JSONL as `specmill eval` reads it (default: the prompts of the run\'s held-out samples)')
    p.add_argument("--check-num-prompts", type=int, default=check["num_prompts"], metavar="N",
                   help=f"prompts to serve (default {check['num_prompts']})")
    p.add_argument("--check-max-tokens", type=int, default=check["max_tokens"], metavar="N",
                   help=f"tokens to generate per prompt (default {check['max_tokens']})")
    p.add_argument("--check-k", type=int, default=check["k"], metavar="K",
                   help="draft tokens per round (default: the run's TTT steps)")
    p.add_argument("--check-target", type=Path, default=check["target"], metavar="DIR",
                   help="the target to serve (default: the run's target path)")
    p.set_defaults(func=_cmd_export)

    from trainer.evaluate import DTYPES as EVAL_DTYPES, ENGINES, EvalConfig

    # The flags' defaults are EvalConfig's, not copies of them.
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}
    p = sub.add_parser("eval", help="measure a draft in vLLM against no speculation and the n-gram proposer",
                       description="Serve the target three ways (no speculation, the EAGLE-3 draft, vLLM's n-gram "
                                   "proposer) on the same prompts, greedy; report acceptance length, tokens per "
                                   "forward, per-position acceptance, tokens/s and speedup (JSON + PNG).")
    p.add_argument("--target", type=Path, required=True, help="target model directory")
    p.add_argument("--draft", type=Path, required=True, help="a draft exported with `specmill export --format eagle`")
    p.add_argument("--prompts", type=Path, required=True,
                   help='JSONL, one {"messages": [...]} (or {"prompt_token_ids": [...]}) per line')
    p.add_argument("--out", type=Path, required=True, help="directory for eval.json, eval.png and the vLLM logs")
    p.add_argument("--json", dest="json_path", type=Path, default=defaults["json_path"],
                   help="report path (default OUT/eval.json)")
    p.add_argument("--k", type=int, default=defaults["k"], help="speculative tokens per round (eagle3 and n-gram)")
    p.add_argument("--max-tokens", type=int, default=defaults["max_tokens"], help="completion tokens per prompt")
    p.add_argument("--concurrency", type=int, default=defaults["concurrency"],
                   help="requests in flight (1 = sequential, batch 1)")
    p.add_argument("--dtype", choices=EVAL_DTYPES, default=defaults["dtype"],
                   help="model dtype (default: for vllm auto = bfloat16 on GPUs and CPUs with AMX/AVX512-BF16, "
                        "float32 on other CPUs; float32 for torch)")
    p.add_argument("--engine", choices=ENGINES, default=defaults["engine"],
                   help="vllm: the vLLM server; torch: specmill's own PyTorch speculative loop (batch 1)")
    p.set_defaults(func=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config, parse_override
    from trainer.train import huge_page_tensors, train

    huge_page_tensors()

    overrides = dict(parse_override(text) for text in args.set or [])
    for dest in [d for d, _, _ in _TRAIN_FLAGS.values()] + ["data.temperatures", "progress"]:
        if getattr(args, dest) is not None:
            overrides[dest] = getattr(args, dest)
    result = train(load_config(args.config, overrides))
    if os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        print(f"trained to step {result.step}; checkpoint {result.checkpoint}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.check import CHECK_FILE, CheckConfig, check_export
    from trainer.export import export

    config = CheckConfig(engine=args.check_engine, prompts=args.check_prompts, num_prompts=args.check_num_prompts,
                         max_tokens=args.check_max_tokens, k=args.check_k, target=args.check_target) \
        if args.check else None  # validated before the export is written
    out = export(args.checkpoint, args.out, format=args.format, dtype=args.dtype, verifier=args.verifier,
                 speculative_tokens=args.speculative_tokens)
    print(f"exported to {out}")
    if config is None:
        return 0
    result = check_export(out, args.checkpoint, config)
    print(f"check: {result.engine} engine, k={result.k}, {result.prompts}, {result.max_tokens} tokens each")
    if result.acceptance_length is not None:
        print(f"  acceptance length {result.acceptance_length:.3f}  measured by {result.engine}")
    if result.simulated_acceptance_length is not None:
        print(f"  acceptance length {result.simulated_acceptance_length:.3f}  simulated by the trainer on "
              f"{result.simulated_on}")
    if not result.passed:
        print(f"specmill export: check failed: {result.message}\n  the export is left in {out} for inspection; "
              f"details in {out / CHECK_FILE} (--no-check skips the check)", file=sys.stderr)
        return 1
    print(f"check passed ({out / CHECK_FILE})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import EvalConfig, evaluate

    fields = ("target", "draft", "prompts", "out", "json_path", "k", "max_tokens", "concurrency", "dtype", "engine")
    report = evaluate(EvalConfig(**{name: getattr(args, name) for name in fields}))
    for way, r in report["ways"].items():
        al = "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}"
        agree = "" if "greedy_agreement" not in r else f"  same text {r['greedy_agreement']:.0%}"
        print(f"{way:7s} AL {al:>5s}  tokens/forward {r['tokens_per_forward']:.2f}  "
              f"{r['output_tokens_per_s']:.1f} tok/s  {r['speedup']:.2f}x{agree}")
    print(f"report {args.json_path or args.out / 'eval.json'}; chart {report['chart']}")
    return 0
