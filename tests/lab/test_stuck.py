"""simulations/lab/stuck.py: SIGUSR2 names the await each trio task is parked in."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

PROGRAM = """
import sys, trio
from rumor.simulations.lab.stuck import install

async def parked_in_a_child() -> None:
    await trio.sleep_forever()

async def main() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked_in_a_child)
        print("ready", flush=True)
        await trio.Event().wait()

install()
trio.run(main)
"""


def test_sigusr2_prints_each_task_and_the_await_it_waits_in() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.2)  # into the run loop's wait
        proc.send_signal(signal.SIGUSR2)
        lines = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "in parked_in_a_child" in line:
                break
        text = "".join(lines)
        assert "trio tasks, each with the awaits it is parked in" in text, text
        assert "task __main__.main" in text and "in main" in text, text
        assert "  task __main__.parked_in_a_child" in text, text
        assert "_traps.py" not in text, text  # trio's inner frames are left out
        assert proc.poll() is None  # it printed and went on
    finally:
        proc.kill()
        proc.wait()
