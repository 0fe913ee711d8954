"""``--tune NAME=VALUE`` and the ``[tune]`` table: every gossip tunable is checked —
the right type, finite, within its range, and sound together — with an error naming
the tunable, at start (flag or file) and on a reload, which refuses and keeps the
running config. ``probe_interval=0`` once spun a core and failed a healthy peer, and
``probe_interval=nan`` crashed the agent."""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import trio

from rumor.cli.main import UsageError, agent_options, parse_agent_args, reread
from rumor.cli.reload import Reloader, ReloadError
from rumor.gossip.config import LAN, LIMITS, PROFILES, GossipConfig

from ..agents import rumor_cmd

#: (setting, words the error must hold): zero, negative, nan, inf, wrong type, a bool
#: or a fraction for a count, and the relations between tunables.
BAD = [
    ("probe_interval=0", "probe_interval must be from 0.01 s"),
    ("probe_interval=-1", "probe_interval must be from 0.01 s"),
    ("probe_interval=nan", "probe_interval must be a finite number"),
    ("probe_interval=inf", "probe_interval must be a finite number"),
    ("probe_interval=-inf", "probe_interval must be a finite number"),
    ("probe_interval=fast", "probe_interval must be a number, found 'fast'"),
    ("gossip_interval=0", "gossip_interval must be from 0.01 s"),
    ("stream_timeout=nan", "stream_timeout must be a finite number"),
    ("push_pull_interval=0", "push_pull_interval must be from 0.1 s"),
    ("suspicion_confirmations=0", "suspicion_confirmations must be from 1"),
    ("retransmit_mult=0", "retransmit_mult must be from 1"),
    ("join_attempts=1.5", "join_attempts must be an integer, found '1.5'"),
    ("join_attempts=-3", "join_attempts must be from 1"),
    ("lifeguard=maybe", "lifeguard must be true or false"),
    ("max_datagram=100", "max_datagram must be from 576"),
    ("probe_timeout=1.5", "probe_timeout (1.5 s) must be shorter than probe_interval (1 s)"),
    ("max_meta_bytes=1400", "max_meta_bytes (1400) must be smaller than max_datagram"),
]


def _opts(*flags: str) -> Any:
    return agent_options(parse_agent_args(["agent", "--name", "a", *flags]))


@pytest.mark.parametrize(("setting", "message"), BAD)
def test_a_bad_tune_flag_is_refused_naming_the_tunable(setting: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        _opts("--tune", setting)
    assert message in str(e.value)
    assert str(e.value).startswith(f"--tune {setting!r}")


#: The same in a config file's [tune] table, with TOML's own types (a float nan, a
#: bool where a number is wanted).
BAD_TOML = [
    ("probe_interval = 0", "probe_interval must be from 0.01 s"),
    ("probe_interval = -0.5", "probe_interval must be from 0.01 s"),
    ("probe_interval = nan", "probe_interval must be a finite number"),
    ("probe_interval = inf", "probe_interval must be a finite number"),
    ('probe_interval = "soon"', "probe_interval must be a number, found 'soon'"),
    ("probe_interval = true", "tune.probe_interval: expected a string or a number, got bool"),
    ("indirect_checks = 2.5", "indirect_checks must be an integer"),
    ("probe_timeout = 2", "probe_timeout (2 s) must be shorter than probe_interval"),
]


@pytest.mark.parametrize(("line", "message"), BAD_TOML)
def test_a_bad_tune_in_a_file_is_refused_naming_the_file_and_the_tunable(
        tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(f'name = "a"\n[tune]\n{line}\n')
    with pytest.raises(UsageError) as e:
        agent_options(parse_agent_args(["agent", "--config", str(path)]))
    assert str(e.value).startswith(f"{path}: tune")
    assert message in str(e.value)


def test_sound_settings_are_taken_and_every_profile_is_sound() -> None:
    opts = _opts("--tune", "probe_interval=0.5", "--tune", "probe_timeout=0.2",
                 "--tune", "indirect_checks=0", "--tune", "lifeguard=false")
    g = opts.gossip
    assert (g.probe_interval, g.probe_timeout, g.indirect_checks, g.lifeguard) == \
        (0.5, 0.2, 0, False)
    for name, cfg in PROFILES.items():
        assert cfg.problems() == [], name
    # Every numeric tunable has a range, so none is left unchecked.
    numeric = {f.name for f in fields(GossipConfig)
               if not isinstance(getattr(LAN, f.name), bool)}
    assert numeric == set(LIMITS)


def test_the_relation_is_checked_whichever_order_the_settings_come_in() -> None:
    # Lowering the interval below the (profile's) timeout is as wrong as raising the
    # timeout above the interval; both in one go in a sound order is fine.
    with pytest.raises(ValueError, match=r"probe_timeout .* shorter than probe_interval"):
        LAN.tuned(["probe_interval=0.3"])
    cfg = LAN.tuned(["probe_interval=0.3", "probe_timeout=0.1"])
    assert (cfg.probe_interval, cfg.probe_timeout) == (0.3, 0.1)


@pytest.mark.parametrize("line", ["probe_interval = nan", "probe_interval = 0",
                                  "suspicion_confirmations = 0", 'gossip_nodes = "x"'])
def test_a_reload_refuses_a_bad_tunable_and_keeps_the_running_config(
        tmp_path: Path, line: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text('name = "a"\n[tune]\nprobe_interval = 0.5\nprobe_timeout = 0.2\n')
    start = agent_options(parse_agent_args(["agent", "--config", str(path)]))
    r = Reloader(start, None, None, reread=reread)  # type: ignore[arg-type]
    path.write_text(f'name = "a"\n[tune]\nprobe_timeout = 0.2\n{line}\n')

    async def main() -> None:
        with pytest.raises(ReloadError) as e:
            await r.reload()
        assert str(e.value).startswith(f"{path}: tune: ")
        assert line.split()[0] in str(e.value)
    trio.run(main)
    assert r.opts is start and r.opts.gossip.probe_interval == 0.5


def test_an_agent_given_nan_exits_at_once_saying_which_tunable() -> None:
    res = subprocess.run([*rumor_cmd(), "agent", "--name", "a", "--bind", "127.0.0.1:0",
                          "--api", "127.0.0.1:0", "--tune", "probe_interval=nan"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "probe_interval must be a finite number, found nan" in res.stderr
    assert "Traceback" not in res.stderr
