"""DNS over TCP under a one-client connection flood (issue 27): how long another client
waits for its answer.

One client (127.0.0.1) opens ``--flood`` TCP connections to the agent's DNS responder
and sends nothing; then a second client (127.0.0.2) sends one query. The responder gets
the descriptor pool an agent with ``--fd-limit`` descriptors gives DNS (30 for 1,024)
and the default TCP limits (10 s idle). It imports ``rumor`` from the interpreter that
runs it, so the same script measures any tree::

    /tmp/base01d-misc/.venv/bin/python bench/dns_tcp_flood.py      # before
    .venv/bin/python bench/dns_tcp_flood.py                         # after
"""

from __future__ import annotations

import argparse
import json
import time

import trio
from dnslib import DNSRecord

from rumor.gossip.accept import FdBudget
from rumor.proxy.api.dns import DnsResponder
from rumor.proxy.api.dns_server import frame, serve_dns


class _Empty:
    """A catalog with nothing in it (the answer's content does not matter here)."""

    def index(self) -> int:
        return 1

    def lookup(self, service: str, tag: str | None) -> list[object]:
        return []

    def node_address(self, node: str) -> str | None:
        return None


async def measure(flood: int, fd_limit: int, wait: float) -> dict[str, object]:
    pool = FdBudget.split(fd_limit, 40).dns
    responder = DnsResponder(_Empty())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            lambda task_status: serve_dns(responder, "127.0.0.1", 0, pool=pool,
                                          task_status=task_status))
        hogs = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(flood)]
        await trio.sleep(0.3)  # the accept loop has taken what it takes
        t0 = time.monotonic()
        other = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        q = DNSRecord.question("web.service.rumor", "A")
        await other.send_all(frame(q.pack()))
        data = b""
        with trio.move_on_after(wait):
            data = await other.receive_some(4096)
        waited = time.monotonic() - t0
        for s in (*hogs, other):
            await s.aclose()
        nursery.cancel_scope.cancel()
    return {"pool": pool.size, "flood": flood, "answered": bool(data),
            "wait_s": round(waited, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flood", type=int, default=100, help="silent connections (100)")
    ap.add_argument("--fd-limit", type=int, default=1024,
                    help="the agent's descriptor limit the DNS pool is cut from (1024)")
    ap.add_argument("--wait", type=float, default=60.0, help="give up after (60 s)")
    args = ap.parse_args()
    print(json.dumps(trio.run(measure, args.flood, args.fd_limit, args.wait)))


if __name__ == "__main__":
    main()
