"""The layout of a training run's directory (`specmill train --out OUT`), in one place for
the trainer that writes it and the export and eval that read it.

    OUT/metrics.jsonl                      one record per logged step (trainer.train.MetricsLog)
    OUT/curves.png                         loss and acceptance curves, redrawn at each checkpoint
    OUT/checkpoints/step-000000123/        one whole checkpoint (trainer.checkpoint)
        state.pt                           {component name: state_dict()}
        meta.json                          the sidecar a person reads
"""

from __future__ import annotations

from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    # Zero-padded so that name order is step order (the newest checkpoint sorts last).
    return f"step-{step:09d}"


def run_dir(checkpoint: Path) -> Path:
    """The run directory a checkpoint directory lies in: OUT/checkpoints/step-N -> OUT."""
    return Path(checkpoint).parent.parent
