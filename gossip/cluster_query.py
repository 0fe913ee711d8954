# layer: shell — waits for a query's answers on the trio clock
"""The trio side of cluster-wide queries (``query.py``): start a query, wait until every
expected member answered or the deadline passed (woken by each answer, never polling),
and hand back what came. The core does the rest; the node's timer loop drives its
resends and fetches, since the query delegate's timers fold into the core's deadline.

Embedding::

    result = await node.queries.run("ping", timeout=2.0)
    for member, answer in result.answers.items(): ...
    print("no answer from", result.missing)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .query import Filter, Handler, Pending, Queries

log = logging.getLogger("rumor.query")


class ClusterQueries:
    """Queries over a running node; ``wake`` asks the node to carry out what the core
    queued (``Node.wake``)."""

    def __init__(self, queries: Queries, wake: Callable[[], None]) -> None:
        self.queries = queries
        self.wake = wake
        self._answered: dict[str, trio.Event] = {}
        queries.on_answer = self._answer
        queries.on_handler_error = self._handler_failed

    def register(self, name: str, handler: Handler, *, write: bool = False,
                 guarded: bool = False) -> None:
        """Answer queries called ``name`` with ``handler`` (see ``Queries.register``)."""
        self.queries.register(name, handler, write=write, guarded=guarded)

    def guarded(self, name: str) -> bool:
        """Whether running ``name`` needs the API token: a guarded or a write query,
        or one this agent does not know (what it would show is unknown)."""
        reg = self.queries.handlers.get(name)
        return reg is None or reg.guarded or reg.write

    async def run(self, name: str, payload: bytes = b"", *, filter: Filter | None = None,
                  timeout: float = 2.0, write: bool | None = None) -> Pending:
        """Ask every matching live member; the answers once all came or at the
        deadline. Raises ``QueryError`` for a query that cannot be sent."""
        qid = self.queries.start(trio.current_time(), name, payload, filter=filter,
                                 timeout=timeout, write=write)
        self.wake()
        pending = self.queries.pending[qid]
        try:
            with trio.move_on_at(pending.deadline):
                while not self.queries.done(trio.current_time(), qid):
                    self._answered[qid] = answered = trio.Event()
                    await answered.wait()
        finally:
            self._answered.pop(qid, None)
            done = self.queries.finish(qid)
        assert done is not None
        return done

    def _answer(self, qid: str) -> None:
        event = self._answered.get(qid)
        if event is not None:
            event.set()

    def _handler_failed(self, name: str, err: BaseException) -> None:
        log.error("the %s query handler failed", name, exc_info=err,
                  extra={"event": "query_handler_failed", "query": name})


__all__ = ["ClusterQueries"]
