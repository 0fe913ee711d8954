"""systemd's notify protocol, spoken directly: readiness, stopping and the watchdog.

A unit with ``Type=notify`` waits for ``READY=1`` before it counts the agent as started
(so units ordered after rumor start once it has joined), shows ``STATUS=`` lines in
``systemctl status``, and with ``WatchdogSec=`` restarts an agent whose pings stop.
The protocol is small enough to speak without libsystemd: one datagram of ``KEY=VALUE``
lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract socket
when it starts with ``@``). Without that variable every call is a no-op, so an agent
started by hand or under another supervisor behaves exactly as before.

The decisions (which address, whether this process pings the watchdog and how often,
what a message says) are plain functions of the environment, apart from the one call
that sends; the socket is the injected ``send`` of :class:`Notifier`. A send that fails
(no listener, a full queue) is logged once at warning and never raises: losing a
notification must not take down the agent it describes.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

log = logging.getLogger("rumor.agent")

#: A send: the datagram and the socket address (``sendto``'s form for AF_UNIX).
Send = Callable[[bytes, bytes], None]


@dataclass(frozen=True)
class NotifySettings:
    """What ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` ask for."""

    #: The socket address (an abstract one starts with a NUL byte); None: no-op.
    address: bytes | None = None
    #: Seconds between ``WATCHDOG=1`` pings (half the unit's ``WatchdogSec=``); None: no
    #: watchdog, or one meant for another process.
    watchdog_period: float | None = None


class UnusableSetting(ValueError):
    """A notify variable is set but cannot be used; the message says why."""


def settings_from(env: Mapping[str, str], pid: int) -> tuple[NotifySettings, list[str]]:
    """The settings for process ``pid`` from ``env``, and one line for the log about
    each value that could not be used (that part is then off)."""
    warnings: list[str] = []
    try:
        address = notify_address(env.get("NOTIFY_SOCKET"))
    except UnusableSetting as e:
        warnings.append(f"{e}: not notifying systemd")
        return NotifySettings(), warnings
    period = None
    if address is not None:
        try:
            period = watchdog_period(env, pid)
        except UnusableSetting as e:
            warnings.append(f"{e}: not pinging the watchdog")
    return NotifySettings(address, period), warnings


def notify_address(value: str | None) -> bytes | None:
    """The AF_UNIX address ``$NOTIFY_SOCKET`` names: an absolute path, or ``@name`` for
    the abstract namespace (a leading NUL byte). None when unset or empty."""
    if not value:
        return None
    if value.startswith("@"):
        raw = b"\0" + value[1:].encode()
    elif value.startswith("/"):
        raw = value.encode()
    else:
        raise UnusableSetting(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor "
                              "an abstract socket (@name)")
    if len(raw) > 107:  # sun_path is 108 bytes, with a NUL after a path
        raise UnusableSetting(f"NOTIFY_SOCKET is {len(raw)} bytes long, longer than a "
                              "socket address can be")
    return raw


def watchdog_period(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings: half of ``$WATCHDOG_USEC``, as systemd recommends, when
    ``$WATCHDOG_PID`` is unset or names ``pid`` (a watchdog for another process, e.g.
    a wrapper's, is not ours to feed). None: no watchdog for this process."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        if not _decimal(owner):
            raise UnusableSetting(f"WATCHDOG_PID={owner!r} is not a process id")
        if int(owner) != pid:
            return None
    if not _decimal(usec) or int(usec) == 0:
        raise UnusableSetting(f"WATCHDOG_USEC={usec!r} is not a positive number of "
                              "microseconds")
    return int(usec) / 2e6


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()  # "²".isdigit(), but int("²") fails


def message(**fields: str) -> bytes:
    """One datagram: ``KEY=VALUE`` lines (a value's line breaks become spaces)."""
    return "".join(f"{k}={' '.join(str(v).splitlines())}\n"
                   for k, v in fields.items()).encode()


def send_datagram(data: bytes, address: bytes) -> None:
    """Send one notification; non-blocking, so a stuck manager never stalls the loop."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(data, socket.MSG_DONTWAIT, address)


class Notifier:
    """Tells the service manager about the agent; every method is a no-op without
    ``$NOTIFY_SOCKET``."""

    def __init__(self, settings: NotifySettings, send: Send = send_datagram) -> None:
        self.settings = settings
        self._send = send
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_environ(cls, env: Mapping[str, str], pid: int,
                     send: Send = send_datagram) -> Notifier:
        settings, warnings = settings_from(env, pid)
        for w in warnings:
            log.warning("%s", w, extra={"event": "sd_notify_config"})
        return cls(settings, send)

    @property
    def enabled(self) -> bool:
        return self.settings.address is not None

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)

    def stopping(self, status: str = "leaving the cluster") -> None:
        self.notify(STOPPING="1", STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    def notify(self, **fields: str) -> bool:
        """Send ``fields``; False when there is nowhere to send or the send failed."""
        if self.settings.address is None:
            return False
        try:
            self._send(message(**fields), self.settings.address)
        except (OSError, ValueError) as e:
            self.failed += 1
            level = logging.WARNING if self.failed == 1 else logging.DEBUG
            log.log(level, "cannot notify systemd (%s): %s%s", ", ".join(fields),
                    getattr(e, "strerror", None) or e,
                    "" if self.failed > 1 else " (further failures are logged at debug)",
                    extra={"event": "sd_notify_failed"})
            return False
        self.sent += 1
        return True

    async def run_watchdog(self) -> None:
        """Ping every period until cancelled (a task of the agent's nursery). A ping is
        sent only when this task gets to run, so it shows the trio loop is turning; a
        loop blocked past ``WatchdogSec=`` gets the agent restarted. Returns at once
        when the unit asks for no watchdog."""
        period = self.settings.watchdog_period
        if period is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(period)
