"""``rumor policy``, offline: the printed examples sign as printed (the fault example
expires an hour from now), a fault that would outlive 24 h is refused before it leaves
the operator's machine, and ``evaluate`` prints fault, rate limit and balancer."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from rumor.cli.policy_cmd import CommandError, _signed, explain_evaluation, run_policy
from rumor.policy.documents import FaultSpec
from rumor.policy.envelope import Envelope
from rumor.policy.evaluate import Evaluator
from rumor.policy.examples import EXAMPLES, FAULT_EXPIRES_PLACEHOLDER, example
from rumor.policy.keys import write_keypair
from rumor.policy.parser import parse_document
from rumor.policy.store import PolicyStore
from rumor.policy.trust import TrustSet


def test_the_fault_example_expires_an_hour_after_it_is_printed(
        capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    assert run_policy(argparse.Namespace(policy_command="example", kind="fault"), "") == 0
    text = capsys.readouterr().out
    assert FAULT_EXPIRES_PLACEHOLDER not in text
    doc = parse_document(text)
    assert doc.expires is not None
    assert before + 3600 - 1 <= doc.expires <= time.time() + 3600
    # Every other example prints as stored.
    assert example("route", before) == EXAMPLES["route"]


def test_printed_examples_sign_and_are_accepted_as_printed(tmp_path: Path) -> None:
    _, _, pub = write_keypair(str(tmp_path / "ops"))
    store = PolicyStore(TrustSet.of([pub]))
    for kind in ("route", "resilience", "access", "fault", "ratelimit"):
        path = tmp_path / f"{kind}.toml"
        path.write_text(example(kind, time.time()))
        env = _signed(str(path), [str(tmp_path / "ops.key")], None)
        assert isinstance(env, Envelope) and env.kind == kind
        out = store.offer_envelope(time.time(), env)
        assert out.accepted, (kind, out.detail)
    found = Evaluator(store.documents()).fault("web")
    assert found is not None
    spec = found[1]
    assert isinstance(spec, FaultSpec)
    # Active as printed for every request to the service: no source or header needed.
    rule = spec.rule_for(None, {}, None)
    assert rule is not None and rule.delay is not None and rule.abort is not None


def test_a_fault_outliving_24h_is_refused_when_signing(tmp_path: Path) -> None:
    write_keypair(str(tmp_path / "ops"))
    path = tmp_path / "fault.toml"
    path.write_text(EXAMPLES["fault"].replace(FAULT_EXPIRES_PLACEHOLDER,
                                              "2099-01-01T00:00:00Z"))
    with pytest.raises(CommandError, match="must expire at most 24h after it is signed"):
        _signed(str(path), [str(tmp_path / "ops.key")], None)


def test_explain_evaluation_names_every_decision() -> None:
    fault = parse_document(example("fault", 1_800_000_000.0))
    limit = parse_document(EXAMPLES["ratelimit"])
    route = parse_document(EXAMPLES["route"])
    ev = Evaluator([fault, limit, route])
    text = explain_evaluation(ev.evaluate("web", source="batch", method="GET",
                                          path="/api/v1", query={"debug": "1", "trace": ""}))
    lines = text.splitlines()
    assert lines[0] == "GET /api/v1?debug=1&trace= to web from batch"
    assert "route:      route 'web-canary', rule 'api-reads': canary 1" in lines
    assert "headers:    set x-env: canary; add x-route: api-reads; remove x-debug-token" in lines
    assert ("fault:      'web-fault': rule 'slow-and-failing': delay 200ms on 10%, "
            "abort (status 503) on 5%") in lines
    assert ("rate limit: 'web-ratelimit': 1000/s in all, 50/s for this source, burst 1s"
            in lines)
    assert "balancer:   peak_ewma; slow start 10s from 10%" in lines
    assert lines[-1].startswith("access:     allowed")
    bare = explain_evaluation(Evaluator([]).evaluate("db"))
    assert "fault:      none" in bare and "rate limit: none" in bare
    assert "route:      no route policy: all 1" in bare
