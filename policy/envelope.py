"""Signed envelopes: how a policy document travels and is stored.

An envelope is the exact *payload* bytes plus one or more Ed25519 signatures of them.
The payload is a small msgpack array that binds the header to the operator's TOML::

    [1, kind, name, version, issued, expires | None, toml_bytes]

so nothing an agent acts on (name, kind, version, expiry, body) lies outside what the
signatures cover. Verifying never re-serializes anything: each signature is checked
over ``CONTEXT + payload`` as carried (the context string keeps a policy signature from
being valid for anything else the same key might sign). The header's ``version`` is
authoritative; the one inside the TOML is only the default used when signing.

On the wire (gossip, API, files) an envelope is the msgpack array
``[1, payload, [[key_id, signature], ...]]``; ``.signed`` files hold the same thing as
JSON with base64 so operators can read and diff them. Sizes are checked before any
parsing, and decoding untrusted bytes raises only ``EnvelopeError``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from .keys import KEY_ID_HEX, SIG_BYTES, SecretKey

ENVELOPE_FORMAT = 1
PAYLOAD_FORMAT = 1
CONTEXT = b"rumor-policy-v1\x00"
FILE_FORMAT = "rumor-policy-envelope/1"

MAX_BODY = 64 * 1024
MAX_SIGNATURES = 16
MAX_PAYLOAD = MAX_BODY + 1024
MAX_ENVELOPE = MAX_PAYLOAD + MAX_SIGNATURES * 96 + 64
MAX_FILE = 2 * MAX_ENVELOPE  # base64 and JSON punctuation
MAX_NAME = 63
MAX_VERSION = 2**63 - 1


class EnvelopeError(ValueError):
    """Bytes that are not a well-formed envelope (the reason says what is wrong)."""


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes


@dataclass(frozen=True)
class Envelope:
    """A decoded (not yet verified) envelope; ``payload`` is exactly what was signed."""

    payload: bytes
    signatures: tuple[Signature, ...]
    kind: str
    name: str
    version: int
    issued: float
    expires: float | None
    body: bytes

    @property
    def digest(self) -> bytes:
        """Identity of this document version: SHA-256 of the payload. Signatures are
        left out so that one document co-signed twice is still one document."""
        return hashlib.sha256(self.payload).digest()

    def key_ids(self) -> list[str]:
        return [s.key_id for s in self.signatures]

    def encode(self) -> bytes:
        return encode_envelope(self.payload, self.signatures)

    def to_file(self) -> str:
        return json.dumps({
            "format": FILE_FORMAT,
            "payload": base64.b64encode(self.payload).decode(),
            "signatures": [{"key_id": s.key_id,
                            "signature": base64.b64encode(s.signature).decode()}
                           for s in self.signatures],
        }, indent=2) + "\n"

    def summary(self) -> dict[str, Any]:
        """Header fields for listings (JSON-ready)."""
        return {"name": self.name, "kind": self.kind, "version": self.version,
                "issued": self.issued, "expires": self.expires,
                "digest": self.digest.hex()[:16], "signed_by": self.key_ids(),
                "size": len(self.payload)}


def make_payload(kind: str, name: str, version: int, issued: float,
                 expires: float | None, body: bytes) -> bytes:
    _check_header(kind, name, version, issued, expires)
    if len(body) > MAX_BODY:
        raise EnvelopeError(f"document is {len(body)} bytes; the limit is {MAX_BODY}")
    payload: bytes = msgpack.packb([PAYLOAD_FORMAT, kind, name, version, issued, expires,
                                    body], use_bin_type=True)
    return payload


def sign(payload: bytes, keys: list[SecretKey],
         existing: tuple[Signature, ...] = ()) -> Envelope:
    """An envelope of ``payload`` signed by ``keys`` (added to ``existing`` signatures,
    so a second operator can co-sign a ``.signed`` file; a key signs at most once)."""
    sigs = list(existing)
    have = {s.key_id for s in sigs}
    for k in keys:
        kid = k.public.id
        if kid in have:
            continue
        sigs.append(Signature(kid, k.sign(CONTEXT + payload)))
        have.add(kid)
    if len(sigs) > MAX_SIGNATURES:
        raise EnvelopeError(f"at most {MAX_SIGNATURES} signatures per envelope")
    return decode_envelope(encode_envelope(payload, tuple(sigs)))


def encode_envelope(payload: bytes, signatures: tuple[Signature, ...]) -> bytes:
    data: bytes = msgpack.packb(
        [ENVELOPE_FORMAT, payload, [[s.key_id, s.signature] for s in signatures]],
        use_bin_type=True)
    return data


def decode_envelope(data: bytes) -> Envelope:
    """Parse (not verify) an envelope from untrusted bytes."""
    if len(data) > MAX_ENVELOPE:
        raise EnvelopeError(f"envelope is {len(data)} bytes; the limit is {MAX_ENVELOPE}")
    outer = _unpack(data, MAX_ENVELOPE, "envelope")
    if not isinstance(outer, list) or len(outer) != 3:
        raise EnvelopeError("envelope must be a 3-element array")
    fmt, payload, raw_sigs = outer
    if fmt != ENVELOPE_FORMAT:
        raise EnvelopeError(f"unknown envelope format {fmt!r} (this agent reads "
                            f"{ENVELOPE_FORMAT})")
    if not isinstance(payload, bytes):
        raise EnvelopeError("payload must be bytes")
    if not isinstance(raw_sigs, list) or not 1 <= len(raw_sigs) <= MAX_SIGNATURES:
        raise EnvelopeError(f"an envelope carries 1 to {MAX_SIGNATURES} signatures")
    sigs: list[Signature] = []
    for i, s in enumerate(raw_sigs):
        if (not isinstance(s, list) or len(s) != 2 or not isinstance(s[0], str)
                or not isinstance(s[1], bytes)):
            raise EnvelopeError(f"signature {i} must be [key_id, bytes]")
        if len(s[0]) != KEY_ID_HEX or any(c not in "0123456789abcdef" for c in s[0]):
            raise EnvelopeError(f"signature {i}: key id must be {KEY_ID_HEX} hex digits")
        if len(s[1]) != SIG_BYTES:
            raise EnvelopeError(f"signature {i}: an Ed25519 signature is {SIG_BYTES} bytes")
        sigs.append(Signature(s[0], s[1]))
    return _with_header(payload, tuple(sigs))


def _with_header(payload: bytes, sigs: tuple[Signature, ...]) -> Envelope:
    if len(payload) > MAX_PAYLOAD:
        raise EnvelopeError(f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD}")
    inner = _unpack(payload, MAX_PAYLOAD, "payload")
    if not isinstance(inner, list) or len(inner) != 7:
        raise EnvelopeError("payload must be a 7-element array")
    fmt, kind, name, version, issued, expires, body = inner
    if fmt != PAYLOAD_FORMAT:
        raise EnvelopeError(f"unknown payload format {fmt!r}")
    if isinstance(issued, int) and not isinstance(issued, bool):
        issued = float(issued)
    if isinstance(expires, int) and not isinstance(expires, bool):
        expires = float(expires)
    _check_header(kind, name, version, issued, expires)
    if not isinstance(body, bytes) or len(body) > MAX_BODY:
        raise EnvelopeError(f"body must be at most {MAX_BODY} bytes")
    return Envelope(payload, sigs, kind, name, version, issued, expires, body)


def _check_header(kind: Any, name: Any, version: Any, issued: Any, expires: Any) -> None:
    if not isinstance(kind, str) or not 1 <= len(kind) <= 32:
        raise EnvelopeError("kind must be a short string")
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME
            or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
            or name[0] in "._-" or name != name.lower()):
        raise EnvelopeError("name must be 1-63 lower-case letters, digits, '.', '_' or '-'")
    if (not isinstance(version, int) or isinstance(version, bool)
            or not 1 <= version <= MAX_VERSION):
        raise EnvelopeError("version must be a positive integer")
    if not isinstance(issued, float) or not math.isfinite(issued) or issued < 0:
        raise EnvelopeError("issued must be a non-negative time")
    if expires is not None and (not isinstance(expires, float) or not math.isfinite(expires)
                                or expires <= issued):
        raise EnvelopeError("expires must be a time after issued, or absent")


def _unpack(data: bytes, limit: int, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_str_len=limit,
                               max_bin_len=limit, max_array_len=64, max_map_len=0,
                               max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError) as e:
        raise EnvelopeError(f"{what} is not valid msgpack ({type(e).__name__})") from None


def read_envelope_file(text: str | bytes) -> Envelope:
    """An envelope from a ``.signed`` file (JSON with base64), or from raw envelope
    bytes (what ``GET /v1/policies/NAME?raw=1`` returns)."""
    if len(text) > MAX_FILE:
        raise EnvelopeError(f"file is {len(text)} bytes; the limit is {MAX_FILE}")
    if isinstance(text, bytes):
        if text[:1] == b"\x93":  # a msgpack 3-array: raw envelope bytes
            return decode_envelope(text)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("not a signed policy file (neither JSON nor msgpack)") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise EnvelopeError("not a signed policy file (invalid JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise EnvelopeError(f"not a signed policy file (expected format {FILE_FORMAT!r})")
    try:
        payload = base64.b64decode(doc["payload"], validate=True)
        sigs = tuple(Signature(s["key_id"], base64.b64decode(s["signature"], validate=True))
                     for s in doc["signatures"])
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise EnvelopeError("signed policy file: payload or signatures are "
                            "malformed") from None
    # Round-trip through the wire form so both paths apply exactly the same checks.
    return decode_envelope(encode_envelope(payload, sigs))
