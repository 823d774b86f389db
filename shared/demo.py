"""`specmill demo`: the whole system on the embedded default, as a user would run it.

It drives the `specmill` command itself (one subprocess per step), so each step is the
same command a user would type and the demo imports nothing from factory/ or trainer/.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("specmill.demo")


@dataclass(kw_only=True, slots=True)
class DemoConfig:
    workdir: Path
    samples: int = 64

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ValueError(f"demo: --samples must be positive, got {self.samples}")


def run_demo(config: DemoConfig) -> int:
    config.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps: list[tuple[str, float]] = []

    def step(title: str, *args: str) -> str:
        log.info("demo step %d: %s", len(steps) + 1, title)
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "shared.cli", *args], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        steps.append((title, time.monotonic() - t0))
        sys.stdout.write(out)
        return out

    model_dir = step("prepare and verify the default target (SmolLM2-135M-Instruct)",
                     "model", "prepare-default").strip().splitlines()[-1]
    shards = config.workdir / "synthetic-shards"
    if not (shards / "manifest.json").exists():
        step(f"write {config.samples} synthetic samples at the target's hidden size", "shards", "synth",
             "--out", str(shards), "--samples", str(config.samples), "--hidden", "576",
             "--vocab", "49152", "--mean-tokens", "256")
    step("verify every shard's checksum and shapes", "shards", "verify", str(shards))
    step("inspect the data set", "shards", "inspect", str(shards), "--sample", "0")

    print("\nspecmill demo report")
    for title, seconds in steps:
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  total {time.monotonic() - started:.1f} s")
    print(f"  target model: {model_dir}")
    print(f"  shards:       {shards}")
    print("  Not in this demo yet (open issues): factory resampling and hidden-state capture, "
          "training, export, acceptance-length evaluation.")
    return 0
