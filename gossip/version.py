"""What this build is: rumor's release and the gossip protocol it speaks.

The release is written in one place, pyproject.toml's ``[project] version``; installing
puts it in the distribution's metadata, and everything that shows it (``rumor
--version``, ``/v1/self``, the agent's start line) reads it from there. A checkout run
without installing has no metadata and says ``0+unknown``.

The two are shown together because they answer different questions: the release says
which code runs, the protocol version (the first byte of every gossip message,
``wire.PROTOCOL_VERSION``) says who it can talk to — an agent drops messages of another
protocol version, whatever the releases.
"""

from __future__ import annotations

from functools import cache

from .wire import PROTOCOL_VERSION

DISTRIBUTION = "rumor"
#: Member tag in which an agent publishes its release, so that an operator (and
#: ``rumor policy publish``) can tell which members a new document kind or field
#: would reach before they understand it. An agent without it predates 0.2.0.
RELEASE_TAG = "rumor.release"


@cache
def release() -> str:
    """The installed release, e.g. ``0.1.0`` (read once: the metadata lookup walks
    ``sys.path``)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a checkout without installing
        return "0+unknown"


def describe() -> str:
    """``rumor 0.1.0 (gossip protocol 1)``: what ``rumor --version`` prints."""
    return f"rumor {release()} (gossip protocol {PROTOCOL_VERSION})"


def release_key(text: str) -> tuple[int, ...] | None:
    """``0.2.0`` as (0, 2, 0), to compare releases; None for what is not one (a
    checkout's ``0+unknown``, a hand-set tag)."""
    parts = text.split("+", 1)[0].split(".")
    if not parts or len(parts) > 4 or not all(p.isdigit() and len(p) <= 6 for p in parts):
        return None
    return tuple(int(p) for p in parts)


__all__ = ["DISTRIBUTION", "PROTOCOL_VERSION", "RELEASE_TAG", "describe", "release",
           "release_key"]
