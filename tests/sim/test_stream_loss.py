"""TCP under loss in the simulator (``simulations/network.py``, ``Simulator._stream``):
stream exchanges lose SYNs, SYN-ACKs and segments and wait for Linux's timers, so a
lossy link slows push-pull and a hopeless one makes it time out; at loss 0, and with
``reliable_streams``, everything is as before."""

from __future__ import annotations

import argparse
import json
import math
import random
from typing import Any

import pytest

from rumor.gossip.config import LAN
from rumor.simulations.cli import add_sim_parser, params_from_args
from rumor.simulations.engine import Simulator
from rumor.simulations.network import (
    MSS,
    SYN_RETRIES,
    SYN_RTO,
    SYNACK_RETRIES,
    Fixed,
    LogNormal,
    Network,
    Partition,
    data_rto,
    tcp_handshake,
    tcp_transfer,
)
from rumor.simulations.scenarios import Params, loss, make_sim, warm_cluster

P = 0.1
D = 0.01  # one-way latency of the hand-made pairs (RTT 20 ms)


def _strip(report: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in report.items() if k != "wall"}
    out["params"] = {k: v for k, v in out["params"].items() if k != "reliable_streams"}
    return out


def _geometric_moments(p: float, cap: int) -> tuple[float, float, float]:
    """For K = copies lost before one gets through (at most ``cap`` allowed), given
    that one did: P(success), E[2^K - 1] and Var[2^K]."""
    probs = [p ** k * (1 - p) for k in range(cap + 1)]
    ok = sum(probs)
    m1 = sum(q * (2 ** k - 1) for k, q in enumerate(probs)) / ok
    m2 = sum(q * 4 ** k for k, q in enumerate(probs)) / ok
    return ok, m1, m2 - (m1 + 1) ** 2


# ---- the model's pieces, against their closed forms ------------------------------------


def test_handshake_extra_delay_has_the_analytic_mean() -> None:
    """SYN phase: E = sum over k of P(k losses)(2^k - 1) s; the SYN-ACK phase adds
    the same on its own timer. 20,000 draws: the tolerance is 4 standard errors."""
    rng = random.Random(1)
    n = 20_000
    extras = [tcp_handshake(rng, P, P).extra for _ in range(n)]
    got = [x for x in extras if x is not None]
    _, syn, var_syn = _geometric_moments(P, SYN_RETRIES)
    _, synack, var_synack = _geometric_moments(P, SYNACK_RETRIES)
    assert syn == pytest.approx(P / (1 - 2 * P), rel=1e-3)  # 0.125 s, caps aside
    want = SYN_RTO * (syn + synack)
    tol = 4 * SYN_RTO * math.sqrt((var_syn + var_synack) / n)
    assert len(got) == n  # giving up needs 7 lost SYNs in a row: p^7 = 1e-7
    assert abs(sum(got) / n - want) < tol, (sum(got) / n, want, tol)
    # One-directional loss only touches its own phase.
    only_syn = [tcp_handshake(rng, P, 0.0).extra for _ in range(n)]
    assert abs(sum(x or 0.0 for x in only_syn) / n - SYN_RTO * syn) \
        < 4 * SYN_RTO * math.sqrt(var_syn / n)


def test_segments_each_lost_and_retransmitted_per_rto() -> None:
    rng = random.Random(2)
    rtt = 2 * D
    rto = data_rto(rtt)
    assert rto == pytest.approx(rtt + 0.2)  # Linux: srtt + max(200 ms, 4 rttvar)
    n = 20_000
    # One segment: RTO * (2^k - 1) for k lost copies.
    _, m1, var = _geometric_moments(P, 15)
    got = [tcp_transfer(rng, 100, P, rtt) for _ in range(n)]
    mean = sum(g.extra or 0.0 for g in got) / n
    assert abs(mean - rto * m1) < 4 * rto * math.sqrt(var / n)
    # Ten segments: every one is lost independently, p/(1-p) copies lost on average
    # (the sampler skips from loss to loss: this checks it against the geometric law).
    got = [tcp_transfer(rng, 10 * MSS, P, rtt) for _ in range(n)]
    per_msg = sum(g.retransmits for g in got) / n
    lost = P / (1 - P)
    assert abs(per_msg - 10 * lost) < 4 * math.sqrt(10 * P / (1 - P) ** 2 / n)
    # A segment with three more behind it is fast-retransmitted one RTT later: the
    # first of ten never waits for an RTO when it is lost once and the rest arrive.
    assert tcp_transfer(_Script([0.0] + [0.99] * 12), 10 * MSS, P, rtt).extra \
        == pytest.approx(rtt)
    # The last three have too few behind them: an RTO, doubled if lost again.
    assert tcp_transfer(_Script([0.0, 0.99, 0.99]), MSS, P, rtt).extra \
        == pytest.approx(rto)
    assert tcp_transfer(_Script([0.0, 0.0, 0.99, 0.99]), MSS, P, rtt).extra \
        == pytest.approx(3 * rto)
    # Segments recover in parallel (SACK): two lost once each cost one RTO, not two.
    u_next = 1 - (1 - P) ** 0.5  # a skip of 0: the very next segment is lost too
    assert tcp_transfer(_Script([0.0, 0.99, u_next, 0.99, 0.99]), 2 * MSS, P, rtt).extra \
        == pytest.approx(rto)
    # No loss, no draw; total loss: never.
    assert tcp_transfer(_Script([]), 10 * MSS, 0.0, rtt).extra == 0.0
    assert tcp_transfer(rng, 10, 1.0, rtt).extra is None
    assert tcp_handshake(rng, 1.0, 0.0).extra is None
    assert tcp_handshake(rng, 0.0, 1.0).extra is None


class _Script(random.Random):
    """Draws given in advance (the geometric skip reads u: 0.0 means "lost next")."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self._draws = list(draws)

    def random(self) -> float:
        return self._draws.pop(0)


# ---- the engine: exchanges on a hand-made pair -------------------------------------------


def _pair(net: Network, stream_timeout: float = 600.0) -> Simulator:
    sim = Simulator(LAN.with_overrides(stream_timeout=stream_timeout), net, seed=5,
                    node_identity="off")
    warm_cluster(sim, 2)
    return sim


def _push_pulls(sim: Simulator, k: int, monkeypatch: pytest.MonkeyPatch,
                src: int = 0, dst: int = 1, run_for: float = 700.0
                ) -> list[tuple[float, bytes | None]]:
    """Open ``k`` push-pulls from ``src`` to ``dst`` now; each one's duration and
    reply, in the order they were opened."""
    core = sim.nodes[src].core
    started: dict[int, float] = {}
    done: dict[int, tuple[float, bytes | None]] = {}
    real = core.stream_reply

    def spy(now: float, exchange: int, reply: bytes | None) -> None:
        if exchange in started:
            done[exchange] = (now - started[exchange], reply)
        real(now, exchange, reply)

    monkeypatch.setattr(core, "stream_reply", spy)
    peer = core.members[sim.nodes[dst].name]
    for _ in range(k):
        def open_one(c: Any) -> None:
            ex = c._stream(sim.now, peer, "push_pull", c._push_pull_body(False), True)
            started[ex] = sim.now
        sim.drive(src, open_one)
    sim.run_until(sim.now + run_for)
    assert set(done) == set(started)
    return [done[ex] for ex in sorted(started)]


def test_lossy_link_slows_push_pull_by_the_analytic_mean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixed latency D: a clean push-pull takes 4 D (SYN, SYN-ACK, ACK + request,
    reply). At loss P both ways, add the handshake's and both single-segment
    transfers' expected repair. Tolerance: 4 standard errors of the analytic law."""
    n = 2000
    sim = _pair(Network(Fixed(D), P))
    got = _push_pulls(sim, n, monkeypatch)
    for nd in sim.nodes:  # one segment each way (the expectation below assumes it)
        assert nd.stream_bytes_out / n < MSS - 200
    assert all(reply for _, reply in got)  # a 600 s timeout: all complete
    _, syn, v_syn = _geometric_moments(P, SYN_RETRIES)
    _, synack, v_synack = _geometric_moments(P, SYNACK_RETRIES)
    _, seg, v_seg = _geometric_moments(P, 15)
    rto = data_rto(2 * D)
    want = 4 * D + SYN_RTO * (syn + synack) + 2 * rto * seg
    sd = math.sqrt(SYN_RTO ** 2 * (v_syn + v_synack) + 2 * rto ** 2 * v_seg)
    mean = sum(t for t, _ in got) / n
    assert abs(mean - want) < 4 * sd / math.sqrt(n), (mean, want)
    assert min(t for t, _ in got) == pytest.approx(4 * D)
    c = sim.counters
    assert c["stream_syn_retransmits"] > 0 and c["stream_retransmits"] > 0
    # No push-pull failed; what did are the pair's own TCP fallback pings (a probe's
    # remaining half second does not cover a lost SYN).
    pings = sum(nd.core.stats["stream_tcp_ping"] for nd in sim.nodes)
    assert c["streams_failed_loss"] <= pings


def test_reliable_streams_restore_the_old_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = _pair(Network(Fixed(D), P, reliable_streams=True))
    got = _push_pulls(sim, 200, monkeypatch)
    assert all(t == pytest.approx(4 * D) and reply for t, reply in got)
    assert not any(k.startswith("stream_") for k in sim.counters)


@pytest.mark.parametrize("link", [(0, 1), (1, 0)])
def test_hopeless_link_makes_every_exchange_over_it_time_out(
        link: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss 1.0 in either direction: no SYN arrives, or no SYN-ACK comes back; each
    push-pull ends at the core's stream timeout (LAN: 10 s) as a failure."""
    sim = _pair(Network(Fixed(D), 0.0, link_loss={link: 1.0}),
                stream_timeout=LAN.stream_timeout)
    before = sim.nodes[0].core.stats["push_pull_failed"]
    got = _push_pulls(sim, 20, monkeypatch, run_for=LAN.stream_timeout + 1)
    assert all(reply is None and t == pytest.approx(LAN.stream_timeout) for t, reply in got)
    assert sim.nodes[0].core.stats["push_pull_failed"] - before >= 20
    assert sim.counters["streams_failed_loss"] >= 20
    # Within 10 s a client sends its SYN at 0, 1, 3 and 7 s: 3 retransmissions each.
    if link == (0, 1):
        assert sim.counters["stream_syn_retransmits"] >= 20 * 3


def test_very_lossy_link_times_push_pull_out_sometimes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At 50% loss the handshake alone averages far beyond the 10 s timeout's reach
    for a good share: some push-pulls fail by loss, others get through."""
    sim = _pair(Network(Fixed(D), 0.5), stream_timeout=LAN.stream_timeout)
    got = _push_pulls(sim, 200, monkeypatch, run_for=LAN.stream_timeout + 1)
    failed = sum(1 for _, reply in got if reply is None)
    assert 0 < failed < 200
    assert sim.counters["streams_failed_loss"] >= failed


def test_partition_that_begins_mid_exchange_blackholes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The model checks a partition again where it has events: when the request
    arrives (here 3 D = 0.3 s after the open) and when the reply does."""
    for reliable, want_reply in ((False, False), (True, True)):
        sim = _pair(Network(Fixed(0.1), 0.0, link_loss={(0, 1): 0.0},
                            reliable_streams=reliable), stream_timeout=5.0)
        # Only 0 -> 1 is cut, after the handshake began: the request cannot land.
        sim.at(sim.now + 0.15, lambda s=sim: s.network.partitions.append(
            Partition(frozenset({0}), frozenset({1}), symmetric=False)))
        ((t, reply),) = _push_pulls(sim, 1, monkeypatch, run_for=6.0)
        # The reliable model only looked at the request's direction when it opened.
        assert (reply is not None) == want_reply
        assert t == pytest.approx(0.4 if want_reply else 5.0)


# ---- loss 0, determinism, the flag ----------------------------------------------------------


def test_loss_zero_changes_nothing() -> None:
    """No loss: the report is the reliable model's, byte for byte (bar the flag)."""
    a = loss(Params(nodes=20, seed=3, sweep=(0.0,), duration=40.0))
    b = loss(Params(nodes=20, seed=3, sweep=(0.0,), duration=40.0, reliable_streams=True))
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


def test_tcp_path_on_loss_free_links_replays_the_reliable_model() -> None:
    """A zero entry in ``link_loss`` turns the TCP model on with every rate 0: it must
    draw nothing more and schedule every step as before (crash included: refusals)."""
    def run(reliable: bool) -> tuple[Any, ...]:
        net = Network(LogNormal(0.0005, 0.5, floor=0.0001), 0.0,
                      link_loss={(0, 1): 0.0}, reliable_streams=reliable)
        assert net.tcp_streams() is not reliable
        sim = Simulator(LAN, net, seed=9)
        warm_cluster(sim, 12)
        sim.run_until(sim.now + 20.0)
        sim.crash(5)
        sim.run_until(sim.now + 40.0)
        nodes = tuple((n.packets_out, n.bytes_in, n.streams_out, n.stream_bytes_out,
                       sorted(n.core.stats.items())) for n in sim.nodes)
        return sim.events, sim.rng.random(), dict(sim.counters), nodes
    a, b = run(False), run(True)
    assert sum(n[2] for n in a[3]) > 12  # streams happened (push-pulls, TCP pings)
    assert a == b


def test_same_seed_same_result_under_the_model() -> None:
    p = Params(nodes=20, seed=2, sweep=(P,), duration=40.0)
    a, b = loss(p), loss(p)
    assert _strip(a) == _strip(b)
    assert a["sim"]["counters"]["stream_syn_retransmits"] > 0
    r = loss(Params(nodes=20, seed=2, sweep=(P,), duration=40.0, reliable_streams=True))
    assert "stream_syn_retransmits" not in r["sim"]["counters"]
    assert _strip(r) != _strip(a)


def test_reliable_streams_flag_reaches_the_network() -> None:
    parser = argparse.ArgumentParser()
    add_sim_parser(parser.add_subparsers(dest="command"))
    for argv, want in ((["sim", "loss"], False), (["sim", "loss", "--reliable-streams"], True)):
        p = params_from_args(parser.parse_args(argv))
        assert p.reliable_streams is want
        sim, _ = make_sim(p, loss=P)
        assert sim.network.reliable_streams is want
        assert sim.network.tcp_streams() is not want
