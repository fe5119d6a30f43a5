"""Shared fixtures. Real data lives outside the repository: tests that need it read the directory
named by NEGAGENT_TEST_DATA and skip, saying why, when it is unset (a user's clone has none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data directory (the layout of the project's data README), or skip."""
    value = os.environ.get("NEGAGENT_TEST_DATA")
    if not value:
        pytest.skip("NEGAGENT_TEST_DATA is not set: no real data directory to test against")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"NEGAGENT_TEST_DATA={value} is not a directory")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer and chat template (converted once into the user cache)."""
    from negagent.models import load_tokenizer
    from tests.helpers import TINY_MODEL

    return load_tokenizer(TINY_MODEL)
