"""Subcommands this package adds to `specmill` (see shared/cli.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
