"""`specmill`: the one command. Each package adds its own subcommands through a
`register(subparsers)` function in its `cli` module, and lists its benchmarks for
`specmill bench` in its `bench/cli` module; this module only wires them and owns the
`shards` group."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("specmill")

# Packages whose `cli.register` adds subcommands, in help order.
_COMMAND_MODULES = ("factory.cli", "trainer.cli", "shared.cli")
# Modules whose `COMMANDS` are the `specmill bench` subcommands, in help order.
_BENCH_MODULES = ("factory.bench.cli", "trainer.bench.cli")


@dataclasses.dataclass(frozen=True, slots=True)
class BenchCommand:
    """One `specmill bench` subcommand: `module` has `add_arguments(parser)` and `run_cli(args)`."""

    name: str
    module: str
    help: str
    description: str


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from shared.shards import ShardError

    try:
        return int(args.func(args) or 0)
    except (ValueError, ShardError, FileNotFoundError) as e:
        # Bad input (config, data set, paths): one clear line, no traceback (-v shows it).
        if args.verbose:
            raise
        print(f"specmill: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmill", description="Train EAGLE-3 speculative-decoding drafts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    bench = sub.add_parser("bench", help="measure throughput against what this machine can do")
    bench_sub = bench.add_subparsers(title="bench commands", metavar="COMMAND", required=True)
    for name in _BENCH_MODULES:
        for command in importlib.import_module(name).COMMANDS:
            module = importlib.import_module(command.module)
            p = bench_sub.add_parser(command.name, help=command.help, description=command.description)
            module.add_arguments(p)
            p.set_defaults(func=module.run_cli)
    return parser


def register(sub: argparse._SubParsersAction) -> None:
    shards = sub.add_parser("shards", help="create, check and benchmark shard data sets")
    ssub = shards.add_subparsers(title="shards commands", metavar="COMMAND", required=True)

    p = ssub.add_parser("synth", help="write a realistic synthetic data set (tests, benchmarks)")
    p.add_argument("--out", required=True, help="data set directory (or filesystem URI, e.g. s3://b/p) to create")
    p.add_argument("--samples", required=True, type=int, help="number of samples")
    p.add_argument("--hidden", required=True, type=int, help="hidden size H")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-tokens", type=int, default=None, help="mean sequence length (default: synth's)")
    p.add_argument("--vocab", type=int, default=None, help="target vocab size (default: synth's)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default=None)
    p.set_defaults(func=_cmd_synth)

    p = ssub.add_parser("verify", help="check every checksum and shape; non-zero exit names the bad shard")
    p.add_argument("dir", help="data set directory or filesystem URI (s3://bucket/prefix, file://...)")
    p.set_defaults(func=_cmd_verify)

    p = ssub.add_parser("inspect", help="summarise a data set (and optionally show one sample)")
    p.add_argument("dir", help="data set directory or filesystem URI (s3://bucket/prefix, file://...)")
    p.add_argument("--sample", type=int, default=None, help="also print sample I")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = ssub.add_parser("bench", help="compare storage layouts against this machine's limits")
    _add_bench_args(p)

    p = sub.add_parser("demo", help="run the whole system end to end on the embedded default")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where artifacts go")
    p.add_argument("--samples", type=int, default=None, help="training conversations (scales the demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.add_argument("--max-tokens", type=int, default=None, help="max tokens per resampled answer")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts the evaluation answers")
    p.add_argument("--quick", action="store_true",
                   help="the smallest honest run of every step (24 conversations, 16 steps, 4 prompts: minutes)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from shared.demo import DemoConfig, run_demo

    given = {k: getattr(args, k) for k in ("samples", "steps", "max_tokens", "eval_prompts") if getattr(args, k) is not None}
    base = DemoConfig.quick(args.workdir) if args.quick else DemoConfig(workdir=args.workdir)
    return run_demo(dataclasses.replace(base, **given))


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from shared.bench import shards

    shards.add_arguments(p)
    p.set_defaults(func=shards.run_cli)


def _cmd_synth(args: argparse.Namespace) -> int:
    from shared.synth import SynthConfig, write_synthetic

    given = {k: getattr(args, k) for k in ("mean_tokens", "vocab", "dtype") if getattr(args, k) is not None}
    config = SynthConfig(samples=args.samples, hidden_size=args.hidden, seed=args.seed, **given)
    manifest = write_synthetic(args.out, config, progress=True)
    print(f"{args.out}: {manifest.rows} samples, {manifest.tokens} tokens, "
          f"{sum(s.bytes for s in manifest.shards) / 1e6:.1f} MB in {len(manifest.shards)} shards")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from shared.shards import verify

    report = verify(args.dir, progress=True)
    for error in report.errors:
        print(f"BAD  {error}", file=sys.stderr)
    status = "OK" if report.ok else "FAILED"
    print(f"{status}: {report.shards_ok} good shards, {report.samples} samples, {report.tokens} tokens, "
          f"{len(report.errors)} problems in {args.dir}")
    return 0 if report.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from shared.shards import Dataset

    ds = Dataset(args.dir)
    m = ds.manifest
    summary = {
        "directory": str(args.dir),
        "complete": m.complete,
        "samples": m.rows,
        "tokens": m.tokens,
        "loss_tokens": sum(s.loss_tokens for s in m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "shards": len(m.shards),
        "target": m.header.target.name,
        "hidden_size": m.header.hidden_size,
        "dtype": m.header.dtype,
        "aux_layer_ids": list(m.header.aux_layer_ids),
        "aux_layer_convention": m.header.aux_layer_convention,
        "last_hidden_state": m.header.last_hidden_state,
        "distinct_loss_tokens": len(m.token_counts),
        "info": m.info,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        width = max(map(len, summary))
        for k, v in summary.items():
            print(f"{k:<{width}}  {v}")
        lengths = ds.lengths()
        if len(lengths):
            p50, p90 = (int(x) for x in (sorted(lengths)[len(lengths) // 2], sorted(lengths)[int(len(lengths) * 0.9)]))
            print(f"{'tokens/sample':<{width}}  min {lengths.min()}  p50 {p50}  p90 {p90}  max {lengths.max()}")
    if args.sample is not None:
        sample = ds[args.sample]
        for k, v in sample.items():
            desc = f"{tuple(v.shape)} {v.dtype}" if hasattr(v, "shape") else repr(v)
            print(f"  [{args.sample}] {k}: {desc}")
        ids, mask = sample["input_ids"], sample["loss_mask"].bool()
        print(f"  [{args.sample}] loss-masked tokens: {int(mask.sum())} of {len(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
