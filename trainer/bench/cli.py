"""The trainer's `specmill bench` subcommands, in help order; shared/cli.py adds them."""

from __future__ import annotations

from shared.cli import BenchCommand

COMMANDS = (
    BenchCommand(
        "train", "trainer.bench.train",
        help="training loop tokens/s and data-wait fraction vs the draft's pure compute on the same batches "
             "(goal >= 0.9)",
        description="Run the real training loop and, on the same batches held in memory, train_step alone; "
                    "report tokens/s of both, their ratio, the data-wait fraction and where a step's time goes."),
    BenchCommand(
        "peers", "trainer.bench.peers.run",
        help="acceptance length of drafts trained by specmill, speculators and SpecForge on one data set",
        description="Make one shard data set with the factory, train drafts with specmill and with the peers' "
                    "trainers (each peer in a venv of its own, its defaults and a matched budget), measure each "
                    "with `specmill eval` in vLLM on held-out prompts; writes WORKDIR/peers.json and peers.png."),
    BenchCommand(
        "quality", "trainer.bench.quality",
        help="the draft's acceptance length vs n-gram on held-out prompts, trained on N conversations",
        description="Resample N real conversations with the default target, train an EAGLE-3 draft, and "
                    "serve it in vLLM next to no speculation and the n-gram proposer on held-out prompts; "
                    "prints the figures next to the goals (acceptance length >= 2.0, tokens per target "
                    "forward >= 1.3x n-gram) and writes WORKDIR/quality.json. Exits 1 when a goal is not met."),
)
