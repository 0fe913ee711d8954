# layer: shell — atomic file writes (os)
"""Crash-safe file writes, shared by the keyring, the policy store and the CA.

Each of them holds state an agent must find whole after a crash or power loss: the
gossip keys, accepted policies, certificates and their keys. A write goes to a
temporary file in the same folder (created 0600, so a secret is never readable by
others, not even for a moment), is fsynced, then renamed over the target, and the
folder is fsynced so the rename itself survives.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *,
                 exclusive: bool = False) -> None:
    """Write so that a crash leaves the old file or the new one, never part of either.

    ``exclusive`` raises ``FileExistsError`` rather than replace a file: a hard link
    publishes the new file and refuses an existing name in one step. Temporary files
    are named ``.NAME.*.tmp`` (what a start-up clean-up may look for)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:  # mkstemp already made it 0600
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:
                # No hard links here (FAT media, some network filesystems): check, rename.
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    """Make a rename or removal in ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
