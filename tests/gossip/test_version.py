"""The release is written once, in pyproject.toml, and read back from the metadata."""

from __future__ import annotations

import tomllib
from pathlib import Path

from rumor.gossip.version import describe, release
from rumor.gossip.wire import PROTOCOL_VERSION

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_release_is_pyprojects_version() -> None:
    # An editable install reads pyproject when installed: after a bump, reinstall.
    with open(PYPROJECT, "rb") as f:
        assert release() == tomllib.load(f)["project"]["version"]


def test_describe_names_release_and_protocol() -> None:
    assert describe() == f"rumor {release()} (gossip protocol {PROTOCOL_VERSION})"
