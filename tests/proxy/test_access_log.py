"""The access log on a virtual clock: entries are written in batches, within the
flush interval, all of them at shutdown, and a disk that cannot keep up loses
entries (counted), never the request path's time."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing

from rumor.proxy.access_log import AccessLog


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_entries_are_written_in_batches_and_the_rest_at_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> None:
        log = AccessLog(str(path), interval=0.5)
        async with trio.open_nursery() as n:
            n.start_soon(log.run)
            log.write({"status": 200, "path": "/a"})
            log.write({"status": 503, "path": "/b"})
            await trio.sleep(0.4)
            assert path.read_text() == ""  # nothing on the request path
            await trio.sleep(0.2)
            assert [e["path"] for e in _lines(path)] == ["/a", "/b"]
            log.write({"status": 200, "path": "/c"})
            n.cancel_scope.cancel()  # shutdown before the next interval
        assert [e["path"] for e in _lines(path)] == ["/a", "/b", "/c"]
        assert all(str(e["ts"]).endswith("Z") for e in _lines(path))
        log.close()
    # The writes run in a worker thread: jump the virtual clock only after a real pause.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))


def test_a_log_that_cannot_keep_up_drops_and_counts(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "a.log"), max_pending=3)
    for i in range(5):
        log.write({"i": i})
    assert log.dropped == 2
    log.close()
    assert [e["i"] for e in _lines(tmp_path / "a.log")] == [0, 1, 2]
