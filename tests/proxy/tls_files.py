"""Certificates for in-process TLS tests: one test CA per temporary directory."""

from __future__ import annotations

from pathlib import Path

from rumor.proxy.ca import init_ca, issue
from rumor.proxy.tls import TlsFiles


def tls_files(tmp_path: Path, node: str, services: list[str]) -> TlsFiles:
    """``node``'s certificate naming ``services``, from the CA under ``tmp_path``
    (made on first use)."""
    ca = tmp_path / "ca"
    if not (ca / "ca.crt").exists():
        init_ca(ca, "test")
    cert, key = issue(ca, node, services, 30, tmp_path / node)
    return TlsFiles(ca / "ca.crt", cert, key)
