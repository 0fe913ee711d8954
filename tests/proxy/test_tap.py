"""Tap sessions: opened by a poll, fed only matching requests within their rate, holding
named headers only, ending by themselves (deadline, cap, idle); payloads and peers'
answers checked."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.proxy.observe import Exchange
from rumor.proxy.tap import (
    IDLE,
    MAX_SESSIONS,
    TapError,
    TapHub,
    TapRequest,
    read_answer,
    tap_request,
)

WALL0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def wall(self) -> float:
        return self.now + WALL0


def send(hub: TapHub, clock: Clock, path: bytes = b"/a", service: str = "web",
         listener: str = "outbound", status: int = 200,
         headers: list[tuple[bytes, bytes]] | None = None) -> None:
    x = Exchange(listener, b"GET", path, "c", clock.now, service=service, source="app",
                 headers=headers or [(b"host", b"web"), (b"authorization", b"secret"),
                                     (b"x-user", b"u1")])
    x.status, x.instance, x.tries, x.headers_at = status, "n1/web-1", 1, clock.now + 0.002
    hub.request_ended(x, clock.now + 0.003, 10, True)


def poll(hub: TapHub, clock: Clock, r: TapRequest) -> dict[str, object]:
    return read_answer(msgpack.packb(hub.poll(clock.now, tap_request(r.payload()))))


def test_a_poll_opens_a_session_that_gets_only_matching_requests() -> None:
    clock = Clock()
    hub = TapHub(clock.wall, clock.now)
    send(hub, clock)  # before the tap: not shown
    r = TapRequest("t1", service="web", path="/api", duration=10, headers=("x-user",))
    assert poll(hub, clock, r)["events"] == []
    send(hub, clock, b"/api/1")
    send(hub, clock, b"/other")
    send(hub, clock, b"/api/2", service="db")
    send(hub, clock, b"/api/3", listener="inbound", status=503)
    got = poll(hub, clock, r)
    events = got["events"]
    assert isinstance(events, list)
    assert [e["path"] for e in events] == ["/api/1", "/api/3"]
    e = events[0]
    assert e["status"] == 200 and e["latency_ms"] == pytest.approx(2.0)
    assert e["at"] == pytest.approx(WALL0 + 50.0) and e["instance"] == "n1/web-1"
    # Named headers only: never the others (no authorization, no host).
    assert e["headers"] == {"x-user": "u1"}
    assert got["matched"] == 2 and got["open"] is True
    assert poll(hub, clock, r)["events"] == []  # taken once


def test_a_session_ends_at_its_deadline_and_a_late_poll_does_not_reopen_it() -> None:
    clock = Clock()
    hub = TapHub(clock.wall, clock.now)
    r = TapRequest("t1", duration=2.0)
    poll(hub, clock, r)
    clock.now += 1.0
    send(hub, clock)
    clock.now += 1.5
    send(hub, clock)  # after the deadline: not taken
    got = poll(hub, clock, r)
    assert len(got["events"]) == 1 and got["open"] is False  # type: ignore[arg-type]
    assert hub.sessions == {}
    assert poll(hub, clock, r)["open"] is False and hub.sessions == {}


def test_an_unpolled_session_ends_by_itself_and_the_data_path_stops_paying() -> None:
    clock = Clock()
    hub = TapHub(clock.wall, clock.now)
    poll(hub, clock, TapRequest("gone", duration=300.0))
    send(hub, clock)
    clock.now += IDLE + 0.1
    send(hub, clock)  # the asker is gone: the session ends on the request path
    assert hub.sessions == {}
    poll(hub, clock, TapRequest("other", duration=300.0))
    clock.now += IDLE + 0.1
    poll(hub, clock, TapRequest("third", duration=300.0))  # or at anyone's poll
    assert list(hub.sessions) == ["third"]


def test_the_rate_and_the_cap_bound_what_a_tap_takes_and_drops_are_counted() -> None:
    clock = Clock()
    hub = TapHub(clock.wall, clock.now)
    r = TapRequest("t1", duration=60.0, rate=10.0, max_events=1000)
    poll(hub, clock, r)
    for _ in range(1000):  # 1,000 requests in one second
        send(hub, clock)
        clock.now += 0.001
    got = poll(hub, clock, r)
    taken = len(got["events"])  # type: ignore[arg-type]
    assert 10 <= taken <= 12  # the burst (1 + rate/10) and a second's refill
    assert got["dropped"] == 1000 - taken and got["matched"] == 1000
    capped = TapRequest("t2", duration=60.0, rate=100.0, max_events=3)
    poll(hub, clock, capped)
    for _ in range(10):
        clock.now += 0.1
        send(hub, clock)
    got = poll(hub, clock, capped)
    assert len(got["events"]) == 3 and got["open"] is False  # type: ignore[arg-type]


def test_too_many_taps_are_refused() -> None:
    clock = Clock()
    hub = TapHub(clock.wall, clock.now)
    for i in range(MAX_SESSIONS):
        poll(hub, clock, TapRequest(f"t{i}"))
    with pytest.raises(TapError, match="open on this agent"):
        poll(hub, clock, TapRequest("onemore"))
    assert hub.stats["refused"] == 1


@pytest.mark.parametrize(("r", "why"), [
    (TapRequest("bad id!"), "letters or digits"),
    (TapRequest("t", listener="sideways"), "listener"),
    (TapRequest("t", duration=301.0), "0 to 300"),
    (TapRequest("t", rate=500.0), "at most 100"),
    (TapRequest("t", max_events=0), "max is"),
    (TapRequest("t", headers=tuple(f"h{i}" for i in range(9))), "header names"),
    (TapRequest("t", headers=("bad:name",)), "header names"),
])
def test_bad_tap_requests_are_refused_with_the_reason(r: TapRequest, why: str) -> None:
    with pytest.raises(TapError, match=why):
        tap_request(r.payload())


def test_a_hostile_answer_is_refused() -> None:
    good = {"v": 1, "events": [], "dropped": 0, "matched": 0, "open": True}
    assert read_answer(msgpack.packb(good))["open"] is True
    for bad in ({**good, "events": [{"path": 5}]}, {**good, "dropped": -1},
                {**good, "events": [{"at": float("nan"), "latency_ms": 1.0, "status": 200,
                                     "tries": 1}]}, {**good, "v": 2}):
        with pytest.raises(TapError):
            read_answer(msgpack.packb(bad))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_junk_payloads_and_answers_raise_only_tap_errors(junk: bytes) -> None:
    with contextlib.suppress(TapError):  # anything else fails the test
        tap_request(junk)
    with contextlib.suppress(TapError):
        read_answer(junk)
