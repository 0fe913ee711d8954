"""``docs/operations.md`` and ``docs/rumor.service`` stay true: the unit in the page is
the shipped file, its ``ExecStart=`` parses as ``rumor agent`` options, it keeps the
settings the page explains, and the example configuration loads."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

from rumor.cli.config import load
from rumor.cli.main import build_parser, subparser

DOCS = Path(__file__).parents[2] / "docs"
PAGE = DOCS / "operations.md"
UNIT = DOCS / "rumor.service"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", PAGE.read_text(), re.M | re.S)


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_page_shows_the_shipped_unit() -> None:
    assert _blocks("ini")[0] == UNIT.read_text()


def test_exec_start_names_only_options_rumor_agent_knows() -> None:
    (exec_start,) = _directives(UNIT.read_text())["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/rumor") and argv[1] == "agent"
    agent = subparser(build_parser(), "agent")
    known = {o for a in agent._actions for o in a.option_strings}
    flags = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")]
    assert flags and set(flags) <= known, set(flags) - known
    args = agent.parse_args(argv[2:])  # parses as the agent would (files not read)
    assert args.config == ["/etc/rumor/"]


def test_the_unit_keeps_what_the_page_promises() -> None:
    d = _directives(UNIT.read_text())
    expected = {"Type": "notify", "Restart": "on-failure", "StateDirectory": "rumor",
                "ProtectSystem": "strict", "CapabilityBoundingSet": "",
                "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "ExecReload": "/bin/kill -HUP $MAINPID"}
    assert {k: d[k][-1] for k in expected} == expected
    assert int(d["WatchdogSec"][0]) > 0
    # No DynamicUser here: the page offers it as a drop-in instead of User=.
    assert "DynamicUser" not in d and d["User"] == ["rumor"]


def test_the_example_configuration_loads(tmp_path: Path) -> None:
    (example,) = [b for b in _blocks("toml") if "/etc/rumor/10-agent.toml" in b]
    path = tmp_path / "10-agent.toml"
    path.write_text(example)
    load([str(path)], subparser(build_parser(), "agent"))  # every key known and typed
    doc = tomllib.loads(example)
    # The unit's StateDirectory= is the data dir, and the keyring is writable there.
    assert doc["data_dir"] == "/var/lib/rumor"
    assert doc["keyring"].startswith("/var/lib/rumor/")


def test_operations_are_linked_from_the_readme_and_the_architecture() -> None:
    root = DOCS.parent
    for page in (root / "README.md", DOCS / "architecture.md"):
        assert "docs/operations.md" in page.read_text(), page
