"""Tiny checkpoints on disk, written once per test session by tools/make_tiny_checkpoint.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-klein")
    assert make_tiny_checkpoint.main([str(folder), "--shards", "2"]) == 0
    return folder


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-klein-base")
    assert make_tiny_checkpoint.main([str(folder), "--base", "--seed", "1"]) == 0
    return folder
