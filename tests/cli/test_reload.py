"""Live reload's decisions: which changed settings apply live and which need a
restart, and a refused configuration that changes nothing (``cli/reload.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from rumor.cli.main import agent_options, parse_agent_args
from rumor.cli.reload import LIVE, Reloader, ReloadError, plan
from rumor.gossip.service_spec import parse_spec
from rumor.policy.keys import SecretKey


def test_plan_splits_live_settings_from_restart_ones() -> None:
    old = {"name": "a", "bind": "127.0.0.1:1", "log_level": "info", "tag": {"r": "1"}}
    new = {"name": "a", "bind": "127.0.0.1:2", "log_level": "debug", "tag": {"r": "2"},
           "service": [{"name": "web", "port": 80}]}
    p = plan(old, new)
    assert p.apply == ("log_level", "service", "tag")
    assert p.restart == ("bind",)
    assert plan(old, dict(old)) == plan({}, {})


def test_the_live_settings_are_the_issues_list() -> None:
    issue = {"service", "tag", "trust_key", "trust_threshold", "log_level", "access_log",
             "tls_ca", "tls_cert", "tls_key", "upstream",  # upstream: issue 32
             "tcp_idle_timeout"}
    assert issue == LIVE


class FakeNode:
    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.append(tags)


class FakeDiscovery:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def deregister(self, sid: str) -> bool:
        self.calls.append(("deregister", sid))
        return True

    def register_many(self, regs: list[Any]) -> dict[str, list[str]]:
        self.calls.append(("register", [r.service.id for r in regs]))
        return {}

    def check_registrations(self, regs: list[Any], removing: Any = ()) -> None:
        pass


def _opts(*flags: str) -> Any:
    return agent_options(parse_agent_args(["agent", "--name", "a", *flags]))


def _reloader(start: Any, then: list[Any]) -> tuple[Reloader, FakeNode, FakeDiscovery]:
    node, disc = FakeNode(), FakeDiscovery()
    answers = iter(then)

    def reread(argv: list[str]) -> Any:
        nxt = next(answers)
        if isinstance(nxt, Exception):
            raise nxt
        return nxt

    r = Reloader(start, node, disc, reread=reread)  # type: ignore[arg-type]
    r.own_tags = {"rumor.inbound": "127.0.0.1:15002"}
    return r, node, disc


def test_services_are_diffed_and_unchanged_ones_keep_their_checks() -> None:
    web, db = "name=web,port=80,check=ttl,ttl=30s", "name=db,port=5432"
    start = _opts("--service", web, "--service", db, "--tag", "rack=r1")
    then = _opts("--service", web, "--service", "name=db,port=5433",
                 "--service", "name=api,port=90", "--tag", "rack=r2")
    later = _opts("--service", "name=api,port=90", "--tag", "rack=r2")
    r, node, disc = _reloader(start, [then, later])

    async def main() -> None:
        assert await r.reload() == {"applied": ["service", "tag"], "restart": []}
        assert disc.calls == [("register", ["db", "api"])]  # web untouched
        assert node.tags == [{"rack": "r2", "rumor.inbound": "127.0.0.1:15002"}]
        assert await r.reload() == {"applied": ["service"], "restart": []}
        assert disc.calls[1:] == [("deregister", "db"), ("deregister", "web")]
    trio.run(main)


def test_a_refused_configuration_changes_nothing_and_restart_settings_stay_reported(
        ) -> None:
    start = _opts("--service", "name=web,port=80")
    moved = _opts("--service", "name=web,port=81", "--bind", "127.0.0.1:9999")
    r, _, disc = _reloader(start, [ReloadError("a.toml: unknown key 'bnd'"), moved,
                                      moved])

    async def main() -> None:
        with pytest.raises(ReloadError, match="bnd"):
            await r.reload()
        assert disc.calls == [] and r.opts is start
        assert await r.reload() == {"applied": ["service"], "restart": ["bind"]}
        # Still running on the old address: the next reload says so again.
        assert await r.reload() == {"applied": [], "restart": ["bind"]}
        assert r.opts.settings["bind"] == "127.0.0.1:7946"
    trio.run(main)


def test_switching_policy_on_needs_a_restart_and_the_rest_still_applies(
        tmp_path: Path) -> None:
    """An agent started without --trust-key runs no policy store: trust keys added to
    its files are reported as needing a restart, and the tag changed with them is
    applied (not the whole reload refused)."""
    pub = tmp_path / "k.pub"
    pub.write_text(SecretKey.generate().public.line() + "\n")
    r, node, _ = _reloader(_opts(), [_opts("--trust-key", str(pub), "--tag", "a=b")])

    async def main() -> None:
        assert await r.reload() == {"applied": ["tag"], "restart": ["trust_key"]}
        assert node.tags == [{"a": "b", "rumor.inbound": "127.0.0.1:15002"}]
    trio.run(main)


class FakeTcpPart:
    idle = 3600.0


def test_the_tcp_idle_timeout_applies_to_the_upstream_ports_and_the_inbound() -> None:
    r, _, _ = _reloader(_opts(), [_opts("--tcp-idle-timeout", "90")])
    r.upstreams, r.tcp_inbound = FakeTcpPart(), FakeTcpPart()  # type: ignore[assignment]

    async def main() -> None:
        assert await r.reload() == {"applied": ["tcp_idle_timeout"], "restart": []}
        assert r.upstreams is not None and r.tcp_inbound is not None
        assert r.upstreams.idle == 90.0 and r.tcp_inbound.idle == 90.0
    trio.run(main)


def test_an_agent_built_in_code_has_nothing_to_reread() -> None:
    opts = _opts()
    opts.argv = None
    r, _, _ = _reloader(opts, [])

    async def main() -> None:
        with pytest.raises(ReloadError, match="not started from a command line"):
            await r.reload()
    trio.run(main)


def test_parse_spec_is_what_services_compare_on() -> None:
    # Two spellings of one registration are equal, so a reload leaves it alone.
    assert parse_spec("name=web,port=80,tags=a|b") == parse_spec("port=80,tags=a|b,name=web")
