"""The mesh TCP preamble: what a caller's sidecar says before a relayed TCP connection.

A TCP connection has no ``Host`` to route by, so the caller's sidecar opens its
connection to the callee's inbound listener with ``protocols.TCP_MAGIC`` and then a
preamble naming the service, the instance it picked and who calls (its identity; under
mutual TLS the certificate is what counts, without TLS the claim is unverified). The
inbound answers once, before any byte of the service flows: accepted, or refused with a
reason code and a phrase, so the caller can log and count why.

Wire format (all lengths big-endian, names UTF-8 without control characters)::

    preamble = version:u8  length:u16  body[length]
    body     = (len:u8 text[len]) x 3          # service, instance, source ("" = none)
    answer   = version:u8  code:u8  len:u8  phrase[len]

Both readers are sans-IO: ``feed`` bytes as they arrive and get the decoded message
once complete (plus any bytes after it), or ``None`` for more. A preamble longer than
``MAX_PREAMBLE`` is refused as soon as its length field says so, never buffered; every
malformed input raises ``PreambleError`` and nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The preamble (and answer) version this build speaks.
VERSION = 1
#: Largest preamble accepted, its 3-byte header included.
MAX_PREAMBLE = 1024
#: Largest name (service, instance, source), in bytes.
MAX_NAME = 255
_HEADER = 3  # version, u16 length


class PreambleError(ValueError):
    """A preamble or answer that cannot be read; ``code`` says which refusal fits."""

    def __init__(self, code: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Refusal(enum.IntEnum):
    """The inbound's answer codes (0: accepted)."""

    ACCEPTED = 0
    BAD_PREAMBLE = 1
    UNSUPPORTED_VERSION = 2
    NOT_SERVED_HERE = 3
    NOT_TCP = 4
    ACCESS_DENIED = 5
    LOCAL_UNREACHABLE = 6
    PREAMBLE_TIMEOUT = 7

    @property
    def label(self) -> str:
        """The code as a metric label and log word (``access_denied``)."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Preamble:
    service: str
    instance: str
    #: Who the caller's sidecar says calls ("" when it has no identity).
    source: str

    def encode(self) -> bytes:
        body = b"".join(_name(n, what) for n, what in ((self.service, "service"),
                                                      (self.instance, "instance"),
                                                      (self.source, "source")))
        if not self.service:
            raise ValueError("a preamble must name a service")
        return bytes((VERSION,)) + len(body).to_bytes(2, "big") + body


@dataclass(frozen=True, slots=True)
class Answer:
    code: Refusal
    phrase: str = ""

    @property
    def accepted(self) -> bool:
        return self.code is Refusal.ACCEPTED

    def encode(self) -> bytes:
        phrase = self.phrase.encode("utf-8", "replace")[:MAX_NAME]
        # A cut may split a character; the reader decodes with "replace" for that.
        return bytes((VERSION, int(self.code), len(phrase))) + phrase


def _name(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_NAME:
        raise ValueError(f"{what} longer than {MAX_NAME} bytes")
    if any(c < 0x20 or c == 0x7F for c in raw):
        raise ValueError(f"{what} contains control characters")
    return bytes((len(raw),)) + raw


class PreambleReader:
    """Reads one preamble (the bytes after ``TCP_MAGIC``)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[Preamble, bytes] | None:
        """(the preamble, the bytes after it) once complete, else None. Raises
        ``PreambleError``."""
        self._buf += data
        buf = self._buf
        if buf and buf[0] != VERSION:
            raise PreambleError(Refusal.UNSUPPORTED_VERSION,
                                f"preamble version {buf[0]}, this agent speaks {VERSION}")
        if len(buf) < _HEADER:
            return None
        length = int.from_bytes(buf[1:3], "big")
        if _HEADER + length > MAX_PREAMBLE:
            raise PreambleError(Refusal.BAD_PREAMBLE, f"preamble of {_HEADER + length} "
                                f"bytes, at most {MAX_PREAMBLE}")
        if len(buf) < _HEADER + length:
            return None
        body, rest = bytes(buf[_HEADER:_HEADER + length]), bytes(buf[_HEADER + length:])
        service, instance, source = _names(body, ("service", "instance", "source"))
        if not service:
            raise PreambleError(Refusal.BAD_PREAMBLE, "the preamble names no service")
        return Preamble(service, instance, source), rest


def _names(body: bytes, whats: tuple[str, ...]) -> list[str]:
    out, at = [], 0
    for what in whats:
        if at >= len(body):
            raise PreambleError(Refusal.BAD_PREAMBLE, f"preamble ends before its {what}")
        n = body[at]
        raw = body[at + 1:at + 1 + n]
        if len(raw) < n:
            raise PreambleError(Refusal.BAD_PREAMBLE, f"preamble ends inside its {what}")
        if any(c < 0x20 or c == 0x7F for c in raw):
            raise PreambleError(Refusal.BAD_PREAMBLE, f"control characters in the {what}")
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PreambleError(Refusal.BAD_PREAMBLE, f"the {what} is not UTF-8") from None
        at += 1 + n
    if at != len(body):
        raise PreambleError(Refusal.BAD_PREAMBLE, f"{len(body) - at} bytes after the "
                            "preamble's fields")
    return out


class AnswerReader:
    """Reads the inbound's answer, on the caller's side."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[Answer, bytes] | None:
        """(the answer, the service's bytes after it) once complete, else None. Raises
        ``PreambleError`` (an unknown code or version is a bad answer)."""
        self._buf += data
        buf = self._buf
        if buf and buf[0] != VERSION:
            raise PreambleError(Refusal.UNSUPPORTED_VERSION,
                                f"answer version {buf[0]}, this agent speaks {VERSION}")
        if len(buf) < 3:
            return None
        try:
            code = Refusal(buf[1])
        except ValueError:
            raise PreambleError(Refusal.BAD_PREAMBLE, f"unknown answer code {buf[1]}") \
                from None
        n = buf[2]
        if len(buf) < 3 + n:
            return None
        phrase = bytes(buf[3:3 + n]).decode("utf-8", "replace")
        return Answer(code, phrase), bytes(buf[3 + n:])


__all__ = ["MAX_NAME", "MAX_PREAMBLE", "VERSION", "Answer", "AnswerReader", "Preamble",
           "PreambleError", "PreambleReader", "Refusal"]
