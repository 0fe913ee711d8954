"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .agents import AgentCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[AgentCluster]:
    """Real agents on 127.0.0.1; whatever is still running at the end is killed."""
    c = AgentCluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
