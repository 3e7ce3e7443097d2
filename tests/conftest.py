"""Shared fixtures. Run the suite with `make test` (or `.venv/bin/python -m pytest tests`)."""
from __future__ import annotations

import pytest

from tests.tiny import build_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("tiny-model"))
