"""The mesh TCP preamble and answer (proxy/tcp_preamble.py): round trips, byte-at-a-time
feeding, the size cap, and hostile bytes that may raise only ``PreambleError``."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rumor.proxy.tcp_preamble import (
    MAX_PREAMBLE,
    VERSION,
    Answer,
    AnswerReader,
    Preamble,
    PreambleError,
    PreambleReader,
    Refusal,
)

names = st.text(st.characters(min_codepoint=0x20, codec="utf-8"),
                max_size=40).filter(lambda s: "\x7f" not in s)


def test_round_trip_with_bytes_after() -> None:
    pre = Preamble("db", "db-1", "web")
    out = PreambleReader().feed(pre.encode() + b"SELECT")
    assert out == (pre, b"SELECT")


def test_fed_one_byte_at_a_time() -> None:
    raw = Preamble("db", "", "").encode()
    reader = PreambleReader()
    for b in raw[:-1]:
        assert reader.feed(bytes((b,))) is None
    assert reader.feed(raw[-1:]) == (Preamble("db", "", ""), b"")


def test_oversized_length_refused_before_the_body_arrives() -> None:
    head = bytes((VERSION,)) + (MAX_PREAMBLE).to_bytes(2, "big")
    with pytest.raises(PreambleError) as e:
        PreambleReader().feed(head)
    assert e.value.code is Refusal.BAD_PREAMBLE
    assert "at most 1024" in e.value.reason


def test_wrong_version_refused_at_the_first_byte() -> None:
    with pytest.raises(PreambleError) as e:
        PreambleReader().feed(b"\x07")
    assert e.value.code is Refusal.UNSUPPORTED_VERSION


@pytest.mark.parametrize("body, words", [
    (b"", "before its service"),
    (b"\x05db", "inside its service"),
    (b"\x02db\x00\x00\x00", "after the preamble"),
    (b"\x02d\n\x00\x00", "control characters"),
    (b"\x02\xff\xfe\x00\x00", "not UTF-8"),
    (b"\x00\x00\x00", "names no service"),
])
def test_malformed_bodies(body: bytes, words: str) -> None:
    raw = bytes((VERSION,)) + len(body).to_bytes(2, "big") + body
    with pytest.raises(PreambleError, match=words):
        PreambleReader().feed(raw)


def test_encode_refuses_what_it_could_not_read_back() -> None:
    with pytest.raises(ValueError):
        Preamble("d\nb", "", "").encode()
    with pytest.raises(ValueError):
        Preamble("x" * 256, "", "").encode()
    with pytest.raises(ValueError):
        Preamble("", "", "").encode()


def test_answers_round_trip_and_cut_long_phrases() -> None:
    ok = Answer(Refusal.ACCEPTED)
    assert AnswerReader().feed(ok.encode() + b"220 hello") == (ok, b"220 hello")
    long = Answer(Refusal.ACCESS_DENIED, "é" * 300)
    got = AnswerReader().feed(long.encode())
    assert got is not None and got[0].code is Refusal.ACCESS_DENIED
    assert len(got[0].phrase.encode()) <= 255 + 3  # one cut character may become U+FFFD


def test_unknown_answer_code_is_an_error() -> None:
    with pytest.raises(PreambleError, match="unknown answer code"):
        AnswerReader().feed(bytes((VERSION, 200, 0)))


@given(service=names.filter(bool), instance=names, source=names)
def test_any_encodable_preamble_reads_back(service: str, instance: str, source: str) -> None:
    pre = Preamble(service, instance, source)
    try:
        raw = pre.encode()
    except ValueError:
        return  # over 255 bytes of UTF-8
    assert len(raw) <= MAX_PREAMBLE
    assert PreambleReader().feed(raw) == (pre, b"")


@given(st.binary(max_size=1200), st.integers(1, 64))
def test_hostile_bytes_raise_only_preamble_error(data: bytes, chunk: int) -> None:
    reader = PreambleReader()
    try:
        for i in range(0, len(data), chunk):
            if reader.feed(data[i:i + chunk]) is not None:
                break
    except PreambleError:
        pass


@given(st.binary(max_size=600))
def test_hostile_answers_raise_only_preamble_error(data: bytes) -> None:
    with contextlib.suppress(PreambleError):
        AnswerReader().feed(data)
