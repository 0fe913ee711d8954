"""Free loopback ports for tests, safe when pytest-xdist runs several workers at once.

``rumor.cli.ports.free_port`` asks the kernel for a port (bind to 0) and never hands
one out twice in its process; but a test passes the port to an agent that binds it
about a second later, and in that window another worker's kernel pick may land on the
same port. So under xdist each worker picks from its own block of ports below the
kernel's ephemeral range (which bind-to-0 and outgoing connections draw from): no other
worker, and no kernel pick, can be handed a port of the block. Outside xdist this is
``rumor.cli.ports.free_port`` unchanged.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from rumor.cli import ports

#: The ports shared out among workers: above the well-known and most registered
#: services' ports, below the ephemeral range (Linux's default starts at 32768).
LOW, HIGH = 12_000, 32_000

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def worker_block() -> range | None:
    """This xdist worker's ports, or None when not under xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return None
    index, count = int(worker[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    high = min(HIGH, _ephemeral_low())
    size = (high - LOW) // max(count, index + 1)
    return range(LOW + index * size, LOW + (index + 1) * size)


def _free(host: str, port: int) -> bool:
    """Whether ``port`` binds for both TCP and UDP now (an agent binds both)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            t.bind((host, port))
            u.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP, never handed out twice in this run: under
    xdist from this worker's block, else from the kernel."""
    block = worker_block()
    if block is None:
        return ports.free_port(host)
    start = random.randrange(len(block))
    for i in range(len(block)):
        port = block[(start + i) % len(block)]
        if port not in _handed_out and _free(host, port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on {host} in {block}")
