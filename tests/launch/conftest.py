"""Fixtures of the launcher tests."""

from __future__ import annotations

import pytest

from launch.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Settings read the environment: start every test from none of the launcher's variables."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
