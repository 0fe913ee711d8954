"""Fixtures shared by the tests, and the ``cluster`` marker.

The tests mirror the packages (``gossip/``, ``policy/``, ``proxy/``, ``sim/``); the
ones that start real agent processes live in ``cluster/`` and carry the ``cluster``
marker, so ``pytest -m "not cluster"`` runs the in-process tests alone (under a
minute).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .agents import AgentCluster

CLUSTER_DIR = Path(__file__).parent / "cluster"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_DIR in item.path.parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[AgentCluster]:
    """Real agents on 127.0.0.1; whatever is still running at the end is killed."""
    c = AgentCluster(tmp_path)
    try:
        yield c
    finally:
        c.close()
