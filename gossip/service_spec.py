"""Service registrations from the three places they come from, checked the same way.

An operator registers services with ``--service name=web,port=8080,...`` on the command
line, in a TOML file (``[[service]]`` tables) or as JSON through the local API. All
three become a mapping and go through ``registration_from_mapping``, so a mistake gets
the same message everywhere: which service, which field, what was expected.

Spec string fields (``key=value`` separated by commas; lists separated by ``|``)::

    name=web            required; a DNS label (letters, digits, '-', '_'; ≤ 63)
    port=8080           required; 1-65535
    id=web-1            default: the name (unique per agent)
    address=10.0.0.5    default: the agent's advertised host
    version=v2  tags=blue|canary  weight=10 (0-65535, default 1; 0 drains)
    protocol=tcp        http (default, HTTP/1.1), http2, grpc or tcp: declared, never
                        guessed; announced as the tag rumor.protocol=tcp (tags starting
                        with "rumor." are the mesh's own and cannot be registered)
    check=http://127.0.0.1:8080/healthz | tcp://127.0.0.1:8080 | ttl
    interval=10s timeout=2s ttl=30s rise=1 fall=1 warn=0 initial=critical

In TOML and JSON the same keys take native values (``port = 8080``, ``tags = [...]``,
durations as numbers of seconds or strings like ``"500ms"``), and ``checks = [{check =
"...", interval = "2s"}, ...]`` gives several checks.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import durations
from .checks import CRITICAL, CheckSpec
from .durations import DurationError

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})$")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_TAG = re.compile(r"^[A-Za-z0-9_.:=/+-]{1,64}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")


def is_service_name(name: str) -> bool:
    """A service name registrations accept: a DNS label (what ``--upstream`` names too)."""
    return _LABEL.match(name) is not None

MAX_TAGS = 32
MAX_CHECKS = 8
SERVICE_KEYS = ("name", "id", "port", "address", "version", "tags", "weight", "protocol",
                "checks")

HTTP = "http"
HTTP2 = "http2"
GRPC = "grpc"
TCP = "tcp"
#: What a service may declare it speaks; ``http`` (HTTP/1.1) is the default.
PROTOCOLS = (HTTP, HTTP2, GRPC, TCP)
#: The service tag carrying a declared protocol other than ``http``: a catalog record
#: has a fixed number of fields, and an older agent keeps an unknown tag as a tag.
PROTOCOL_TAG = "rumor.protocol="
#: Service tags starting with this are the mesh's own; an operator cannot register them.
RESERVED_TAG_PREFIX = "rumor."
CHECK_KEYS = ("check", "interval", "timeout", "ttl", "rise", "fall", "warn", "initial")


class SpecError(ValueError):
    """A registration that cannot be accepted; the message names the field."""


@dataclass(frozen=True, slots=True)
class ServiceDef:
    """What an agent announces about one local service."""

    id: str
    name: str
    port: int
    address: str = ""
    tags: tuple[str, ...] = ()
    version: str = ""
    weight: int = 1


    @property
    def protocol(self) -> str:
        return protocol_of(self.tags)


def protocol_of(tags: tuple[str, ...] | list[str]) -> str:
    """The protocol an instance's tags declare (``http`` when none does, or when the tag
    names one this build does not know)."""
    for t in tags:
        if t.startswith(PROTOCOL_TAG):
            p = t[len(PROTOCOL_TAG):]
            if p in PROTOCOLS:
                return p
    return HTTP


def protocol_tags(protocol: str) -> tuple[str, ...]:
    """The tags announcing ``protocol`` (none for the default)."""
    return () if protocol == HTTP else (PROTOCOL_TAG + protocol,)


@dataclass(frozen=True, slots=True)
class Registration:
    service: ServiceDef
    checks: tuple[CheckSpec, ...] = ()


def parse_spec(text: str) -> Registration:
    """Parse a ``--service`` spec string (see the module docstring)."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"service spec {text!r}: expected key=value, got {part!r}")
        if key in fields:
            raise SpecError(f"service spec {text!r}: field {key!r} given twice")
        fields[key] = value.strip()
    if "tags" in fields:
        fields["tags"] = [t for t in fields["tags"].split("|") if t]
    return registration_from_mapping(fields, where=f"service spec {text!r}")


def registration_from_mapping(doc: Any, where: str = "service") -> Registration:
    """Validate a mapping (from a spec, TOML table or JSON body) into a Registration."""
    if not isinstance(doc, Mapping):
        raise SpecError(f"{where}: expected a table/object of fields, got "
                        f"{type(doc).__name__}")
    unknown = [k for k in doc if k not in SERVICE_KEYS and k not in CHECK_KEYS]
    if unknown:
        raise SpecError(f"{where}: unknown field {unknown[0]!r} (expected one of "
                        f"{', '.join(SERVICE_KEYS + CHECK_KEYS)})")
    if "name" not in doc:
        raise SpecError(f"{where}: field 'name' is required")
    name = _text(doc["name"], "name", where)
    if not is_service_name(name):
        raise SpecError(f"{where}: name {name!r}: expected a DNS label (letters, digits, "
                        "'-' or '_', at most 63, starting with a letter or digit)")
    where = f"service {name!r}"
    sid = _text(doc.get("id", name), "id", where)
    if not _ID.match(sid):
        raise SpecError(f"{where}: id {sid!r}: expected 1-128 of letters, digits, "
                        "'_', '.', ':' or '-'")
    if "port" not in doc:
        raise SpecError(f"{where}: field 'port' is required (1-65535)")
    port = _int(doc["port"], "port", where, 1, 65535)
    address = _text(doc.get("address", ""), "address", where)
    if address and not _ADDRESS.match(address):
        raise SpecError(f"{where}: address {address!r}: expected a host name or IP")
    version = _text(doc.get("version", ""), "version", where)
    if version and not _VERSION.match(version):
        raise SpecError(f"{where}: version {version!r}: expected 1-64 of letters, digits, "
                        "'_', '.', '+' or '-'")
    tags_raw = doc.get("tags", [])
    if isinstance(tags_raw, str):
        tags_raw = [t for t in tags_raw.split("|") if t]
    if not isinstance(tags_raw, list | tuple):
        raise SpecError(f"{where}: tags: expected a list of strings")
    tags: list[str] = []
    for t in tags_raw:
        if not isinstance(t, str) or not _TAG.match(t):
            raise SpecError(f"{where}: tag {t!r}: expected 1-64 of letters, digits or "
                            "'_.:=/+-'")
        if t.startswith(RESERVED_TAG_PREFIX):
            raise SpecError(f"{where}: tag {t!r}: tags starting with "
                            f"{RESERVED_TAG_PREFIX!r} are the mesh's own (declare a "
                            "protocol with protocol=)")
        if t not in tags:
            tags.append(t)
    if len(tags) > MAX_TAGS:
        raise SpecError(f"{where}: {len(tags)} tags: at most {MAX_TAGS}")
    # 0 drains: the instance stays registered (and healthy), gets no new requests.
    weight = _int(doc.get("weight", 1), "weight", where, 0, 65535)
    protocol = _text(doc.get("protocol", HTTP), "protocol", where)
    if protocol not in PROTOCOLS:
        raise SpecError(f"{where}: protocol {protocol!r}: expected one of "
                        f"{', '.join(PROTOCOLS)}")

    checks: list[CheckSpec] = []
    if "check" in doc:
        checks.append(_check({k: doc[k] for k in CHECK_KEYS if k in doc}, where))
    else:
        stray = [k for k in CHECK_KEYS if k in doc]
        if stray:
            raise SpecError(f"{where}: {stray[0]!r} given without check=")
    extra = doc.get("checks", [])
    if not isinstance(extra, list | tuple):
        raise SpecError(f"{where}: checks: expected a list of tables")
    for i, c in enumerate(extra):
        if not isinstance(c, Mapping):
            raise SpecError(f"{where}: checks[{i}]: expected a table of check fields")
        bad = [k for k in c if k not in CHECK_KEYS]
        if bad:
            raise SpecError(f"{where}: checks[{i}]: unknown field {bad[0]!r} (expected "
                            f"one of {', '.join(CHECK_KEYS)})")
        if "check" not in c:
            raise SpecError(f"{where}: checks[{i}]: field 'check' is required")
        checks.append(_check(c, f"{where} checks[{i}]"))
    if len(checks) > MAX_CHECKS:
        raise SpecError(f"{where}: {len(checks)} checks: at most {MAX_CHECKS}")
    svc = ServiceDef(sid, name, port, address, (*tags, *protocol_tags(protocol)), version,
                     weight)
    return Registration(svc, tuple(checks))


def _check(c: Mapping[str, Any], where: str) -> CheckSpec:
    target = _text(c["check"], "check", where)
    kw: dict[str, Any] = {}
    for key in ("interval", "timeout", "ttl"):
        if key in c:
            kw[key] = parse_duration(c[key], key, where)
    for key in ("rise", "fall", "warn"):
        if key in c:
            kw[key] = _int(c[key], key, where, 0 if key == "warn" else 1, 100)
    if "initial" in c:
        kw["initial"] = _text(c["initial"], "initial", where)
    if target == "ttl":
        if "ttl" not in kw:
            raise SpecError(f"{where}: a ttl check needs ttl= (e.g. ttl=30s)")
        spec = CheckSpec("ttl", "", **kw)
    else:
        url = urlsplit(target)
        if url.scheme in ("http", "https"):
            if not url.hostname:
                raise SpecError(f"{where}: check {target!r}: expected http://HOST[:PORT]/PATH")
            _port_of(url, where, target)
            spec = CheckSpec("http", target, **kw)
        elif url.scheme == "tcp":
            if not url.hostname or url.port is None:
                raise SpecError(f"{where}: check {target!r}: expected tcp://HOST:PORT")
            _port_of(url, where, target)
            spec = CheckSpec("tcp", f"{url.hostname}:{url.port}", **kw)
        else:
            raise SpecError(f"{where}: check {target!r}: expected http://..., https://..., "
                            "tcp://HOST:PORT or ttl")
        if "ttl" in kw:
            raise SpecError(f"{where}: ttl= only applies to check=ttl")
    if "timeout" not in kw and spec.kind != "ttl":
        # Default timeout: 2 s, but never longer than the interval.
        spec = CheckSpec(spec.kind, spec.target, spec.interval, min(2.0, spec.interval),
                         spec.ttl, spec.rise, spec.fall, spec.warn, spec.initial)
    try:
        spec.validate()
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None
    return spec


def _port_of(url: Any, where: str, target: str) -> None:
    try:
        url.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise SpecError(f"{where}: check {target!r}: port out of range") from None


def parse_duration(value: Any, key: str = "duration", where: str = "") -> float:
    """A duration (``durations.py``'s grammar, unit optional) or a number of seconds."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool):
        raise SpecError(f"{prefix}{key} {value!r}: expected a duration like 2s or 500ms")
    if isinstance(value, int | float):
        if value < 0 or value != value or value == float("inf"):
            raise SpecError(f"{prefix}{key} {value!r}: expected a non-negative duration")
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(DurationError):
            return durations.parse_duration(value.strip())
    raise SpecError(f"{prefix}{key} {value!r}: expected a duration like 2s, 500ms or 1m")


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where}: {key} {value!r}: expected a string")
    return value


def _int(value: Any, key: str, where: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise SpecError(f"{where}: {key} {value!r}: expected an integer from {low} to {high}")
    return value


def registrations_from_toml(doc: Mapping[str, Any], where: str) -> list[Registration]:
    """The ``[[service]]`` tables of a parsed TOML config file."""
    unknown = [k for k in doc if k != "service"]
    if unknown:
        raise SpecError(f"{where}: unknown top-level key {unknown[0]!r} (expected "
                        "[[service]] tables)")
    services = doc.get("service", [])
    if not isinstance(services, list):
        raise SpecError(f"{where}: 'service' must be an array of tables ([[service]])")
    return [registration_from_mapping(s, f"{where}: service #{i + 1}")
            for i, s in enumerate(services)]


def registration_to_mapping(reg: Registration) -> dict[str, Any]:
    """The TOML/JSON fields that ``registration_from_mapping`` reads back into ``reg``
    (``rumor config show`` prints them as ``[[service]]`` tables)."""
    s = reg.service
    out: dict[str, Any] = {"name": s.name, "port": s.port}
    if s.id != s.name:
        out["id"] = s.id
    if s.address:
        out["address"] = s.address
    if s.version:
        out["version"] = s.version
    tags = [t for t in s.tags if not t.startswith(RESERVED_TAG_PREFIX)]
    if tags:
        out["tags"] = tags
    if s.weight != 1:
        out["weight"] = s.weight
    if s.protocol != HTTP:
        out["protocol"] = s.protocol
    if reg.checks:
        out["checks"] = [_check_to_mapping(c) for c in reg.checks]
    return out


def _check_to_mapping(c: CheckSpec) -> dict[str, Any]:
    target = {"ttl": "ttl", "tcp": f"tcp://{c.target}"}.get(c.kind, c.target)
    out: dict[str, Any] = {"check": target}
    if c.kind == "ttl":
        out["ttl"] = durations.format_duration(c.ttl)
    else:
        out["interval"] = durations.format_duration(c.interval)
        out["timeout"] = durations.format_duration(c.timeout)
    out.update({"rise": c.rise, "fall": c.fall, "warn": c.warn, "initial": c.initial})
    return out


__all__ = ["CRITICAL", "GRPC", "HTTP", "HTTP2", "PROTOCOLS", "PROTOCOL_TAG",
           "RESERVED_TAG_PREFIX", "TCP", "Registration", "ServiceDef", "SpecError",
           "is_service_name", "parse_duration", "parse_spec", "protocol_of", "protocol_tags",
           "registration_from_mapping", "registration_to_mapping", "registrations_from_toml"]
