"""The sidecar's own error codes: each has a status, a side and a doc; every status the
shells answer themselves has a code; bodies are bounded valid JSON whatever the input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.proxy.errors import (
    ERROR_CODE_HEADER,
    MAX_BODY,
    MAX_INSTANCES,
    ErrorCode,
    error_body,
    listener_code,
    try_failure_code,
)

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {
    "unknown_service": 503, "no_healthy_instance": 503, "no_instance_in_subset": 503,
    "instances_draining": 503, "breaker_open": 503, "pending_limit": 503,
    "upstream_connect_failed": 503, "upstream_reset": 502, "upstream_bad_response": 502,
    "upstream_timeout": 504, "overall_timeout": 504, "rate_limited": 429,
    "fault_abort": None, "fault_reset": None, "access_denied": 403, "loop_detected": 508,
    "bad_target": 400, "not_served_here": 404, "local_connect_failed": 503,
    "local_reset": 502, "local_bad_response": 502, "local_timeout": 504,
    "bad_request": 400, "request_timeout": 408, "headers_too_large": 431,
    "body_too_large": 413, "internal_error": 500, "not_implemented": 501,
    "http_version_not_supported": 505,
    "protocol_mismatch": 505,
}


def test_every_code_has_its_status_a_side_and_a_doc() -> None:
    assert {c.value: c.status for c in ErrorCode} == EXPECTED
    for code in ErrorCode:
        assert code.side in ("outbound", "inbound", "listener")
        assert code.doc and "\n" not in code.doc
        assert code == code.value and re.fullmatch(r"[a-z_]+", code.value)
    assert "retry_budget_exhausted" not in {c.value for c in ErrorCode}
    assert ERROR_CODE_HEADER == b"x-rumor-error-code"


def _self_made_statuses() -> set[int]:
    """The literal statuses the shells and the codec answer with themselves."""
    found: set[int] = set()
    for name in ("outbound", "inbound", "relay", "codec", "attempts"):
        text = (ROOT / "proxy" / f"{name}.py").read_text()
        found |= {int(s) for s in re.findall(
            r"(?:_answer\([^)]*?|_refuse\(x, |simple_reply\(|refuse\(|_fail\(|ProtocolError\(|"
            r"Answer\()\s*(\d{3})\b", text, re.S)}
    return found


def test_every_self_made_status_has_a_code() -> None:
    statuses = _self_made_statuses()
    assert {400, 404, 408, 431, 501, 503, 504, 505, 508} <= statuses  # the grep works
    codes = {c.status for c in ErrorCode}
    assert statuses - {502} <= codes  # 502: a crash (internal_error) or a reset
    assert 502 in codes


def test_listener_and_try_failure_codes() -> None:
    assert listener_code(400) is ErrorCode.BAD_REQUEST
    assert listener_code(408) is ErrorCode.REQUEST_TIMEOUT
    assert listener_code(431) is ErrorCode.HEADERS_TOO_LARGE
    assert listener_code(413) is ErrorCode.BODY_TOO_LARGE
    assert listener_code(501) is ErrorCode.NOT_IMPLEMENTED
    assert listener_code(505) is ErrorCode.HTTP_VERSION_NOT_SUPPORTED
    assert listener_code(418) is ErrorCode.INTERNAL_ERROR
    assert try_failure_code("connect-failure", inbound=False) is \
        ErrorCode.UPSTREAM_CONNECT_FAILED
    assert try_failure_code("502", inbound=False) is ErrorCode.UPSTREAM_RESET
    assert try_failure_code("502", inbound=True, bad_response=True) is \
        ErrorCode.LOCAL_BAD_RESPONSE
    assert try_failure_code("504", inbound=True) is ErrorCode.LOCAL_TIMEOUT
    for cond in ("connect-failure", "502", "504"):
        for inbound in (False, True):
            code = try_failure_code(cond, inbound=inbound)
            assert code.side == ("inbound" if inbound else "outbound")


def test_a_body_says_what_it_was_given_and_omits_none() -> None:
    body = error_body(ErrorCode.UPSTREAM_RESET, agent="node-1", service="payments",
                      phrase="retry budget exhausted after 2 tries", tries=2,
                      instances=["n2/payments-1", "n3/payments-1"],
                      last_failure="n3/payments-1: connection reset", policy="res-pay")
    assert json.loads(body) == {
        "error": "upstream_reset", "message": "retry budget exhausted after 2 tries",
        "agent": "node-1", "service": "payments", "tries": 2,
        "instances": ["n2/payments-1", "n3/payments-1"],
        "last_failure": "n3/payments-1: connection reset", "policy": "res-pay"}
    assert json.loads(error_body(ErrorCode.RATE_LIMITED)) == {"error": "rate_limited"}
    assert json.loads(error_body(ErrorCode.ACCESS_DENIED, phrase="no", tries=None,
                                 service=None)) == {"error": "access_denied", "message": "no"}


def test_hostile_input_stays_bounded() -> None:
    huge = "\x00\x1b[31m\"\\\u2028\ud800é𝄞" * 10_000
    body = error_body(ErrorCode.BAD_TARGET, agent=huge, service=huge, phrase=huge,
                      tries=10**30, instances=[huge] * 1000, last_failure=huge, policy=huge)
    assert len(body) <= MAX_BODY
    got = json.loads(body)
    assert got["error"] == "bad_target" and got["tries"] == 1_000_000
    assert len(got["instances"]) == MAX_INSTANCES + 1
    assert got["instances"][-1] == f"… and {1000 - MAX_INSTANCES} more"
    text = body.decode("utf-8")  # valid UTF-8: the lone surrogate is gone
    assert not any(ord(ch) < 0x20 for ch in text)
    assert error_body(ErrorCode.BAD_TARGET, instances="n1/web-1").count(b"n1/web-1") == 1


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from(list(ErrorCode)),
       texts=st.lists(st.one_of(st.none(), st.text(max_size=3000)), min_size=5, max_size=5),
       tries=st.one_of(st.none(), st.integers()),
       instances=st.one_of(st.none(), st.lists(st.text(max_size=500), max_size=40)))
def test_any_input_is_valid_json_within_the_cap(
        code: ErrorCode, texts: list[str | None], tries: int | None,
        instances: list[str] | None) -> None:
    agent, service, phrase, last_failure, policy = texts
    body = error_body(code, agent=agent, service=service, phrase=phrase, tries=tries,
                      instances=instances, last_failure=last_failure, policy=policy)
    assert len(body) <= MAX_BODY
    got = json.loads(body.decode("utf-8"))
    assert got["error"] == code.value
    for key, value in (("agent", agent), ("service", service), ("message", phrase),
                       ("last_failure", last_failure), ("policy", policy)):
        assert (key in got) == (value is not None)
    if tries is not None:
        assert 0 <= got["tries"] <= 1_000_000


@pytest.mark.parametrize("code", list(ErrorCode))
def test_a_short_input_is_kept_whole(code: ErrorCode) -> None:
    got = json.loads(error_body(code, phrase="why", service="s", agent="a"))
    assert got == {"error": code.value, "message": "why", "service": "s", "agent": "a"}
