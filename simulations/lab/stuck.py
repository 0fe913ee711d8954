# layer: shell — a debugging aid: signal handlers that print where a lab waits
"""Where a lab that will not stop is waiting.

``kill -USR1 PID`` prints every thread's Python stack (faulthandler). That alone says
little of a trio program: an idle run loop is one frame in epoll, whatever its tasks
wait for. ``kill -USR2 PID`` prints each trio task with the chain of awaits it is
parked in, which names the wait (a process, a socket, a shielded teardown).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import trio


def install() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGUSR2, _print_tasks)


def _print_tasks(signum: int, frame: FrameType | None) -> None:
    # A Python signal handler runs in the main thread, which is trio's, so the run
    # loop's state is there to read (outside trio.run there is nothing to print).
    import trio
    out = sys.stderr
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        print("rumor lab: no trio run in progress", file=out, flush=True)
        return
    if root is None:
        return
    print("rumor lab: trio tasks, each with the awaits it is parked in:", file=out)
    _print_task(root, 0, out)
    out.flush()


def _print_task(task: trio.lowlevel.Task, depth: int, out: TextIO) -> None:
    pad = "  " * depth
    print(f"{pad}task {task.name}", file=out)
    inside_trio = False
    for f, lineno in task.iter_await_frames():
        # trio's own frames below the first one (sleep, receive_some) are all alike.
        in_trio = f"{os.sep}trio{os.sep}" in f.f_code.co_filename
        if not (in_trio and inside_trio):
            print(f"{pad}  {f.f_code.co_filename}:{lineno} in {f.f_code.co_name}", file=out)
        inside_trio = in_trio
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            _print_task(child, depth + 1, out)

