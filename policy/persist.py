# layer: shell — stores accepted documents on disk (os, time)
"""Accepted documents on disk, in the agent's ``--data-dir``.

Layout under ``DATA_DIR/policies/``: one ``NAME.env`` per held document and
``trust/VERSION.env`` per link of the trust chain, each the raw envelope bytes exactly
as received (so re-verifying at start checks the same bytes the signatures cover).
Files are written atomically (temporary file, fsync, rename, fsync of the directory):
a crash leaves the old version or the new one, never half of either.

Nothing on disk is believed: at start every file is offered to the store like a
message from a peer. A file that fails (corrupt, tampered, signed by a key no longer
trusted) moves to ``rejected/`` with the reason in the log; the agent never loads it
and never crashes on it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..gossip.files import fsync_dir, write_atomic
from .envelope import MAX_ENVELOPE, Envelope

SUFFIX = ".env"


class PolicyDirectory:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir) / "policies"
        self.trust_dir = self.root / "trust"
        self.rejected_dir = self.root / "rejected"
        for d in (self.root, self.trust_dir, self.rejected_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_for(self, env: Envelope) -> Path:
        if env.kind == "trust":
            return self.trust_dir / f"{env.version}{SUFFIX}"
        return self.root / f"{env.name}{SUFFIX}"

    def save(self, env: Envelope) -> Path:
        path = self.path_for(env)
        write_atomic(path, env.encode())
        return path

    def remove(self, env: Envelope) -> None:
        path = self.path_for(env)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)

    def load(self) -> list[tuple[Path, bytes | None]]:
        """Every stored envelope, trust chain first in version order (each link must be
        verified before the documents its keys signed). ``None`` for a file that cannot
        be read or is larger than any envelope."""
        trust = sorted(self.trust_dir.glob(f"*{SUFFIX}"),
                       key=lambda p: (int(p.stem) if p.stem.isdigit() else -1, p.name))
        docs = sorted(self.root.glob(f"*{SUFFIX}"))
        out: list[tuple[Path, bytes | None]] = []
        for p in trust + docs:
            try:
                if p.stat().st_size > MAX_ENVELOPE:
                    out.append((p, None))
                    continue
                out.append((p, p.read_bytes()))
            except OSError:
                out.append((p, None))
        return out

    def set_aside(self, path: Path) -> Path:
        """Move a file that failed verification out of the way (kept for forensics)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        prefix = "trust-" if path.parent == self.trust_dir else ""
        dest = self.rejected_dir / f"{prefix}{path.name}.{stamp}"
        n = 1
        while dest.exists():
            dest = self.rejected_dir / f"{prefix}{path.name}.{stamp}.{n}"
            n += 1
        os.replace(path, dest)
        fsync_dir(path.parent)
        return dest

    def leftovers(self) -> list[Path]:
        """Temporary files of a write interrupted by a crash (removed at start)."""
        return [p for d in (self.root, self.trust_dir) for p in d.glob(".*.tmp")]
