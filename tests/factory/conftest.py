"""Fixtures for the factory tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.default_model import MODEL_NAME, DefaultModelConfig, prepare_default


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model, prepared once per session exactly as `specmill model prepare-default` does
    (download, convert, loss check, transformers-vs-vLLM check), about a minute on 2 cores.

    Into a fresh directory rather than the user's cache: the tests must exercise this checkout's
    conversion, not a directory an older version left behind."""
    out = tmp_path_factory.mktemp("models") / MODEL_NAME
    return prepare_default(DefaultModelConfig(out=out))
