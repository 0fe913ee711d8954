"""Carrying out what a core asked for: one dispatch for the agent, the simulator and
the unit tests' network.

A core returns effects (send this datagram, open that stream, a member changed, the
join finished, the leave was gossiped, something worth a warning). What each means
differs only in its I/O: a trio socket, the simulator's event heap, a test's queue.
So each runtime supplies an ``EffectHandler`` and the ``EffectExecutor`` dispatches
to it; a new effect type is a new method here and a type error in every runtime that
lacks it, not a branch silently missing in one of three copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .effects import (
    Effect,
    JoinFinished,
    LeaveFinished,
    MemberEvent,
    Notice,
    SendPacket,
    StreamRequest,
)


class EffectHandler(Protocol):
    """What a runtime does with each kind of effect (all synchronous: a runtime that
    must wait, such as for a stream, starts a task)."""

    def send_packet(self, e: SendPacket) -> None: ...

    def open_stream(self, e: StreamRequest) -> None: ...

    def member_event(self, e: MemberEvent) -> None: ...

    def join_finished(self, e: JoinFinished) -> None: ...

    def leave_finished(self, e: LeaveFinished) -> None: ...

    def notice(self, e: Notice) -> None: ...


#: ``on_error(effect, exception)``: an effect that could not be carried out.
ErrorHook = Callable[[Effect, Exception], None]


class EffectExecutor:
    """Dispatches effects to a handler by type (a table lookup per effect: the
    simulator runs this millions of times)."""

    def __init__(self, handler: EffectHandler, on_error: ErrorHook | None = None) -> None:
        self._table: dict[type, Callable[[Any], None]] = {
            SendPacket: handler.send_packet,
            StreamRequest: handler.open_stream,
            MemberEvent: handler.member_event,
            JoinFinished: handler.join_finished,
            LeaveFinished: handler.leave_finished,
            Notice: handler.notice,
        }
        self._on_error = on_error

    def run(self, effects: Iterable[Effect]) -> None:
        """Carry out ``effects`` in order. With ``on_error``, one that raises costs
        that effect only: the rest of the batch still runs."""
        table = self._table
        if self._on_error is None:
            for e in effects:
                table[type(e)](e)
            return
        for e in effects:
            try:
                table[type(e)](e)
            except Exception as err:
                self._on_error(e, err)


__all__ = ["EffectExecutor", "EffectHandler", "ErrorHook"]
