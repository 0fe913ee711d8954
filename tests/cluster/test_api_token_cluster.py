"""The API token end to end: a real agent refuses a CLI write without it and takes
one with it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..agents import Agent, rumor, wait_for


@contextlib.contextmanager
def agent_with_token(tmp_path: Path) -> Iterator[tuple[Agent, Path]]:
    """A running agent whose API wants the token in the file it yields (killed after)."""
    token = tmp_path / "token"
    token.write_text("t0k-" + "x" * 28 + "\n")
    token.chmod(0o600)
    a = Agent("a0", tmp_path, ["--api-token-file", str(token)])
    a.start()
    try:
        wait_for(a.members, 20, "the agent's API")
        yield a, token
    finally:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(10)


def test_the_cli_sends_the_token_to_a_real_agent(tmp_path: Path) -> None:
    with agent_with_token(tmp_path) as (a, token):
        res = rumor("leave", "--api", a.api, check=False)
        assert res.returncode == 1 and "requires an API token" in res.stderr, res.stderr
        res = rumor("leave", "--api", a.api, "--token-file", str(tmp_path / "nope"),
                    check=False)
        assert res.returncode == 1 and "cannot read the API token file" in res.stderr
        assert a.proc is not None and a.proc.poll() is None  # nothing changed
        rumor("leave", "--api", a.api, "--token-file", str(token))
        assert a.wait_exit(15) == 0


def test_tap_explain_and_unknown_queries_need_the_token_reads_of_rates_do_not(
        tmp_path: Path) -> None:
    with agent_with_token(tmp_path) as (a, token):
        for args in (["tap", "--duration", "1s"], ["explain", "a0"],
                     ["query", "no-such-query"]):
            res = rumor(*args, "--api", a.api, check=False)
            assert res.returncode == 1 and "requires an API token" in res.stderr, (args,
                                                                                res.stderr)
        assert "1 answered" in rumor("query", "ping", "--api", a.api).stdout
        assert "1 agent(s)" in rumor("stat", "--api", a.api).stdout
        res = rumor("tap", "--duration", "1s", "--api", a.api, "--token-file", str(token))
        assert "0 request(s) shown" in res.stderr
        res = rumor("explain", "a0", "--api", a.api, "--token-file", str(token))
        assert "1 agent(s) answered of 1 asked" in res.stdout
