"""An upstream declaration: ``SERVICE=HOST:PORT``, a local port bound for one TCP service.

Consul's ``upstreams`` convention: the application connects to a local port and the
caller's sidecar carries the connection to an instance of the service. The port is
declared per service (``--upstream db=127.0.0.1:15432``, repeatable, or ``upstream =
[...]`` in a configuration file) because a TCP connection names no destination.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..gossip.address import format_address, parse_address
from ..gossip.service_spec import is_service_name


@dataclass(frozen=True, slots=True)
class Upstream:
    service: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.service}={format_address((self.host, self.port))}"


def parse_upstream(text: str) -> Upstream:
    """``SERVICE=HOST:PORT`` (or ``SERVICE=PORT``, on 127.0.0.1); raises ValueError
    saying what is wrong."""
    service, eq, where = text.partition("=")
    service = service.strip()
    if not eq or not service or not where.strip():
        raise ValueError(f"{text!r}: expected SERVICE=HOST:PORT (e.g. db=127.0.0.1:15432)")
    if not is_service_name(service):
        raise ValueError(f"{text!r}: {service!r} is not a service name (letters, digits, "
                         "_ and -, at most 63)")
    where = where.strip()
    if where.isdigit():
        where = f"127.0.0.1:{where}"
    try:
        host, port = parse_address(where)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: port {port} is not 1-65535")
    return Upstream(service, host, port)


__all__ = ["Upstream", "parse_upstream"]
