"""A lab leaves nothing behind: not after Ctrl-C or SIGTERM, and not after kill -9 once
``rumor lab clean`` has read its ledger; and clean touches nothing it did not make."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rumor.simulations.lab.kernel import why_not_here

pytestmark = pytest.mark.cluster
FOREIGN = "rltestforeign"


@pytest.fixture
def ledgers(tmp_path: Path) -> Iterator[Path]:
    reason = why_not_here()
    if reason is not None:
        pytest.skip(f"no lab here: {reason}")
    path = tmp_path / "ledgers"
    yield path
    if any(path.glob("rl*.jsonl")):  # a test failed before its lab was undone
        _clean(path)


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _host_state() -> dict[str, str]:
    """What the lab must never change in the namespace it runs from."""
    return {"links": _sh("ip", "-o", "link"), "tables": _sh("nft", "list", "tables"),
            "qdiscs": _sh("tc", "qdisc"), "addrs": _sh("ip", "-o", "addr")}


def _netns() -> set[str]:
    return {line.split()[0] for line in _sh("ip", "netns", "list").splitlines() if line}


def _default_sigint() -> None:
    # Started from a shell's background job, this process ignores SIGINT, and so would
    # the lab (Python keeps an inherited SIG_IGN): Ctrl-C as a terminal sends it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_lab(ledgers: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**os.environ, "RUMOR_LAB_DIR": str(ledgers)}
    proc = subprocess.Popen([sys.executable, "-m", "rumor.cli", "lab", "loss", "--nodes",
                             "3", "--loss", "0", "--duration", "60", "--profile", "local",
                             "--quiet", *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        files = list(ledgers.glob("rl*.jsonl")) if ledgers.is_dir() else []
        if files:
            entries = [json.loads(x) for x in files[0].read_text().splitlines()]
            agents = [e for e in entries if e["kind"] == "process"
                      and str(e["what"]).startswith("agent")]
            if len(agents) == 3:
                time.sleep(2.0)  # let them run
                return proc, files[0]
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the lab did not start its agents within 40 s")


def _clean(ledgers: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUMOR_LAB_DIR": str(ledgers)}
    return subprocess.run([sys.executable, "-m", "rumor.cli", "lab", "clean"], env=env,
                          capture_output=True, text=True, timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _recorded(ledger: Path) -> tuple[str, set[str], list[int], list[Path]]:
    entries = [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]
    lab = entries[0]["lab"]
    spaces = {e["name"] for e in entries if e["kind"] == "netns"}
    pids = [e["pid"] for e in entries if e["kind"] == "process"]
    dirs = [Path(e["path"]) for e in entries if e["kind"] == "dir"]
    return lab, spaces, pids, dirs


@pytest.fixture
def foreign() -> object:
    """A namespace, bridge and nftables table that are not the lab's."""
    subprocess.run(["ip", "netns", "del", FOREIGN], capture_output=True)
    _sh("ip", "netns", "add", FOREIGN)
    _sh("ip", "-n", FOREIGN, "link", "add", "br9", "type", "bridge")
    _sh("ip", "netns", "exec", FOREIGN, "nft", "add", "table", "inet", "rumor_lab")
    yield FOREIGN
    subprocess.run(["ip", "netns", "del", FOREIGN], capture_output=True)


def test_kill_9_then_clean_removes_exactly_what_the_lab_made(ledgers: Path,
                                                             foreign: object) -> None:
    before = _host_state()
    proc, ledger = _start_lab(ledgers, "--delay", "fixed:0.001")
    lab, spaces, pids, dirs = _recorded(ledger)
    proc.kill()
    proc.wait()
    # Killed: it could not clean, and its ledger says what is left.
    assert spaces <= _netns() and len(spaces) == 4
    assert any(_alive(p) for p in pids)  # agents and the delay line outlive it
    env = {**os.environ, "RUMOR_LAB_DIR": str(ledgers)}
    listed = subprocess.run([sys.executable, "-m", "rumor.cli", "lab", "list"], env=env,
                            capture_output=True, text=True)
    assert f"{lab}  loss  4 namespaces  left behind" in listed.stdout
    r = _clean(ledgers)
    assert r.returncode == 0, r.stderr
    assert f"deleted namespace {lab}-sw" in r.stdout
    assert not spaces & _netns()
    assert not any(_alive(p) for p in pids)
    assert not ledger.exists() and not any(d.exists() for d in dirs)
    # Nothing it did not make was touched.
    assert FOREIGN in _netns()
    assert "br9" in _sh("ip", "-n", FOREIGN, "-o", "link")
    assert "rumor_lab" in _sh("ip", "netns", "exec", FOREIGN, "nft", "list", "tables")
    assert _host_state() == before
    again = _clean(ledgers)
    assert again.returncode == 0 and "nothing to clean" in again.stdout


@pytest.mark.parametrize(("how", "code", "said"), [
    (signal.SIGINT, 130, "interrupted; the lab was cleaned up"),
    (signal.SIGTERM, 128 + signal.SIGTERM, "stopped by SIGTERM; the lab was cleaned up")],
    ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_cleans_up_by_itself(ledgers: Path, how: signal.Signals,
                                               code: int, said: str) -> None:
    before = _host_state()
    proc, ledger = _start_lab(ledgers)
    _, spaces, pids, dirs = _recorded(ledger)
    proc.send_signal(how)
    assert proc.stderr is not None
    try:
        got = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        # Say where it hangs: the lab prints its threads' stacks on SIGUSR1 and its trio
        # tasks' awaits on SIGUSR2 (simulations/lab/stuck.py).
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGUSR2)
        time.sleep(1.0)
        proc.kill()
        proc.wait()
        raise AssertionError(f"rumor lab still running 30 s after {how.name}; its "
                             "stderr:\n" + proc.stderr.read().decode()[-8000:]) from None
    err = proc.stderr.read().decode()
    assert got == code, err
    assert said in err
    assert not spaces & _netns()
    assert not any(_alive(p) for p in pids)
    assert not ledger.exists() and not any(d.exists() for d in dirs)
    assert _host_state() == before
