"""Parsing ``HOST:PORT`` strings given by operators."""

from __future__ import annotations

from .wire import Address

DEFAULT_PORT = 7946


def parse_address(text: str, default_port: int | None = DEFAULT_PORT) -> Address:
    """``"10.0.0.5:7946"``, ``"node1"`` (default port), ``"[::1]:7946"`` → (host, port).

    Raises ``ValueError`` with a message that names the bad part."""
    s = text.strip()
    if not s:
        raise ValueError("empty address: expected HOST:PORT")
    host, port_s = s, ""
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}: missing ']'")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {text!r}: expected ':' after ']'")
            port_s = rest[1:]
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    elif ":" in s:
        raise ValueError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise ValueError(f"bad address {text!r}: missing host")
    if not port_s:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT")
        return (host, default_port)
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad address {text!r}: port must be a number from 0 to 65535")
    return (host, int(port_s))


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
