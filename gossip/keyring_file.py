# layer: shell — reads and writes the keyring file (os)
"""The keyring's I/O: the key file an agent loads at start and rewrites after every
cluster-wide change, and fresh keys drawn from the OS. The sans-IO ``keyring.py``
holds the rules; this is what the shell (CLI, ``cluster_keyring.py``) calls."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from .files import write_atomic
from .keyring import KEY_BYTES, Keyring, KeyringError


def generate_key() -> str:
    """A new random key, base64 (what ``rumor keyring generate`` prints)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def load_keyring(path: Path) -> Keyring:
    """The keyring in ``path`` (one base64 key per line, primary first)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise KeyringError(f"cannot read keyring {path}: {e.strerror}") from None
    try:
        return Keyring.from_text(text)
    except KeyringError as e:
        raise KeyringError(f"{path}: {e}") from None


def save_keyring(ring: Keyring, path: Path) -> None:
    """Write atomically, owner-only: the file holds the cluster's secret."""
    write_atomic(path, ring.to_text().encode(), 0o600)


__all__ = ["generate_key", "load_keyring", "save_keyring"]
