"""systemd's notify protocol (``cli/systemd.py``): the address forms of
``$NOTIFY_SOCKET``, the watchdog period and whose it is, messages, no-op without the
variable, a failing send that is logged once and never raises, and the watchdog task
on virtual time; one round trip through a real datagram socket for each address form."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from rumor.cli.systemd import (
    Notifier,
    NotifySettings,
    UnusableSetting,
    message,
    notify_address,
    send_datagram,
    settings_from,
    watchdog_period,
)

PID = 4242


class Recorder:
    """A send that keeps what it was given (or fails with ``error``)."""

    def __init__(self, error: OSError | None = None) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self.error = error

    def __call__(self, data: bytes, address: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((data, address))


def test_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/42") == \
        b"\0/org/freedesktop/systemd1/notify/42"
    assert notify_address(None) is None
    assert notify_address("") is None
    with pytest.raises(UnusableSetting, match="neither an absolute path"):
        notify_address("run/notify")
    with pytest.raises(UnusableSetting, match="neither an absolute path"):
        notify_address("vsock:2:1234")
    with pytest.raises(UnusableSetting, match="longer than a socket address"):
        notify_address("/" + "x" * 200)


def test_watchdog_period_is_half_the_interval_for_this_process_only() -> None:
    assert watchdog_period({"WATCHDOG_USEC": "10000000"}, PID) == 5.0
    assert watchdog_period({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(PID)},
                           PID) == 1.5
    # Meant for another process (a wrapper that exec'd something else): not ours.
    assert watchdog_period({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, PID) is None
    assert watchdog_period({}, PID) is None
    for bad in ({"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "0"},
                {"WATCHDOG_USEC": "-5"}, {"WATCHDOG_USEC": "²"},
                {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}):
        with pytest.raises(UnusableSetting):
            watchdog_period(bad, PID)


def test_settings_from_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "@notify", "WATCHDOG_USEC": "2000000"}
    assert settings_from(env, PID) == (NotifySettings(b"\0notify", 1.0), [])
    # No socket: no watchdog either (there is nowhere to ping).
    assert settings_from({"WATCHDOG_USEC": "2000000"}, PID) == (NotifySettings(), [])
    s, warnings = settings_from({"NOTIFY_SOCKET": "notify"}, PID)
    assert s == NotifySettings()
    assert warnings == ["NOTIFY_SOCKET='notify' is neither an absolute path nor an "
                        "abstract socket (@name): not notifying systemd"]
    s, warnings = settings_from({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "x"}, PID)
    assert s == NotifySettings(b"/n", None)
    assert warnings == ["WATCHDOG_USEC='x' is not a positive number of microseconds: "
                        "not pinging the watchdog"]


@given(st.dictionaries(st.sampled_from(["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"]),
                       st.text(max_size=200)), st.integers(1, 2**22))
def test_any_environment_gives_settings_or_warnings_never_an_error(
        env: dict[str, str], pid: int) -> None:
    s, warnings = settings_from(env, pid)
    assert s.address is None or len(s.address) <= 107
    assert s.watchdog_period is None or s.watchdog_period > 0
    assert all("\n" not in w for w in warnings)


def test_messages() -> None:
    assert message(READY="1", STATUS="joined") == b"READY=1\nSTATUS=joined\n"
    # A line break in a status would start a new assignment: it becomes a space.
    assert message(STATUS="two\nlines") == b"STATUS=two lines\n"
    sent = Recorder()
    n = Notifier(NotifySettings(b"/n"), sent)
    n.ready("joined through 1 of 1 seed(s)")
    n.stopping()
    n.status("busy")
    n.watchdog()
    assert [d for d, _ in sent.sent] == [
        b"READY=1\nSTATUS=joined through 1 of 1 seed(s)\n",
        b"STOPPING=1\nSTATUS=leaving the cluster\n", b"STATUS=busy\n", b"WATCHDOG=1\n"]
    assert {a for _, a in sent.sent} == {b"/n"} and n.sent == 4


def test_without_the_variable_every_call_is_a_no_op() -> None:
    sent = Recorder()
    n = Notifier.from_environ({}, PID, sent)
    assert not n.enabled
    n.ready("x")
    n.stopping()
    n.watchdog()
    assert not n.notify(STATUS="x")
    trio.run(n.run_watchdog)  # returns at once: no watchdog asked for
    assert sent.sent == [] and (n.sent, n.failed) == (0, 0)


def test_a_failing_send_is_logged_once_at_warning_and_never_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(NotifySettings(b"/n"), Recorder(ConnectionRefusedError(111, "refused")))
    with caplog.at_level(logging.DEBUG, logger="rumor.agent"):
        assert not n.notify(READY="1")
        n.watchdog()
        n.stopping()
    assert n.failed == 3 and n.sent == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "cannot notify systemd (READY): refused (further failures are logged at debug)"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_an_unusable_variable_is_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rumor.agent"):
        n = Notifier.from_environ({"NOTIFY_SOCKET": "relative"}, PID, Recorder())
    assert not n.enabled
    assert "not notifying systemd" in caplog.records[0].getMessage()


def test_watchdog_pings_every_half_interval_until_cancelled() -> None:
    sent = Recorder()
    times: list[float] = []

    def record(data: bytes, address: bytes) -> None:
        times.append(trio.current_time())
        sent(data, address)

    n = Notifier(NotifySettings(b"/n", watchdog_period=2.5), record)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.run_watchdog)
            await trio.sleep(10.1)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert times == [0.0, 2.5, 5.0, 7.5, 10.0]
    assert {d for d, _ in sent.sent} == {b"WATCHDOG=1\n"}


def _receiver(address: str | bytes) -> socket.socket:
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.bind(address)
    r.settimeout(5)
    return r


def test_real_datagrams_to_a_path_and_to_an_abstract_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with _receiver(str(path)) as r:
        n = Notifier.from_environ({"NOTIFY_SOCKET": str(path)}, PID)
        n.ready("up")
        assert r.recv(4096) == b"READY=1\nSTATUS=up\n"
    name = f"rumor-test-{os.getpid()}-{id(path)}"
    with _receiver(b"\0" + name.encode()) as r:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, PID)
        n.stopping()
        assert r.recv(4096) == b"STOPPING=1\nSTATUS=leaving the cluster\n"


def test_nobody_listening_is_an_error_of_the_send(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        send_datagram(b"READY=1\n", str(tmp_path / "absent").encode())
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "absent")}, PID)
    assert not n.notify(READY="1") and n.failed == 1
