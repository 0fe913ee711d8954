"""``rumor sim SCENARIO``: run a chaos scenario and print its report.

Wire it into the main parser with ``add_sim_parser(subparsers)`` and dispatch
``args.command == "sim"`` to ``run_sim_command(args)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..gossip.config import PROFILES

if TYPE_CHECKING:
    from .scenarios import Params

#: The scenarios' names, so that building the parser does not import the simulator
#: (every ``rumor`` command builds it: 0.2 s of start-up). tests/sim checks them
#: against ``scenarios.SCENARIOS``.
SCENARIO_NAMES = ("catalog", "churn", "converge", "crash", "detect", "loss", "partition",
                  "policy", "slow", "traffic")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") \
            from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _sweep(text: str) -> tuple[float, ...]:
    return tuple(_fraction(x) for x in text.split(",") if x)


def add_sim_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    s = subparsers.add_parser(
        "sim", help="run a deterministic chaos simulation over the real gossip code",
        description="Simulate a cluster of real gossip cores on a virtual clock. "
        "Scenarios: converge (join through seeds), crash (k nodes die), loss "
        "(false positives over a sweep of loss rates), slow (intermittently paused "
        "nodes, Lifeguard vs plain SWIM), detect (kill -9 one node after another, as the "
        "shared harness does), partition (split, heal, merge back), "
        "churn (steady failures and restarts), policy (a signed document spreads), "
        "catalog (registrations and health flips spread, trial after trial), "
        "traffic (open-loop requests through the proxy's real request-path cores to "
        "instances of given behaviour, per balancer; no gossip).")
    s.add_argument("scenario", choices=SCENARIO_NAMES, metavar="SCENARIO",
                   help="one of: " + ", ".join(SCENARIO_NAMES))
    s.add_argument("--nodes", type=_positive_int, default=100)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--loss", type=_fraction, default=None,
                   help="datagram loss rate (loss scenario: run just this rate)")
    s.add_argument("--duration", type=float, default=None,
                   help="simulated seconds of the measured phase (scenario default)")
    s.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    s.add_argument("--no-lifeguard", action="store_true",
                   help="plain SWIM (the slow scenario always runs both)")
    s.add_argument("--latency", default=None, metavar="SPEC",
                   help="fixed:D, uniform:LO:HI or lognormal:MEDIAN:SIGMA, in seconds")
    s.add_argument("--cold", action="store_true",
                   help="join every node through the seeds first instead of starting "
                   "from a converged cluster")
    s.add_argument("--crashes", type=_positive_int, default=1,
                   help="crash: nodes that die at once; churn: crashes per minute")
    s.add_argument("--slow-fraction", type=_fraction, default=0.02,
                   help="slow: fraction of nodes that stall (default 0.02)")
    s.add_argument("--mean-pause", type=float, default=8.0,
                   help="slow: mean stall of a slow node's message handling (s)")
    s.add_argument("--mean-run", type=float, default=8.0,
                   help="slow: mean time between stalls (s)")
    s.add_argument("--sweep", type=_sweep, default=None, metavar="L1,L2,...",
                   help="loss: loss rates to sweep (default 0,0.05,0.1,0.2,0.3)")
    s.add_argument("--node-identity", choices=("off", "prefer", "require"),
                   default="require", help="signed membership, as the agent's option: "
                   "every node signs its word with a key derived from the seed "
                   "(default require; off: version 1's unsigned gossip)")
    s.add_argument("--reliable-streams", action="store_true",
                   help="stream exchanges (push-pull, TCP pings, large messages) ignore "
                   "loss, as before the TCP model; by default, under loss, they lose "
                   "SYNs and segments and wait for TCP's retransmission timeouts")
    s.add_argument("--tune", action="append", default=[], metavar="NAME=VALUE",
                   help="override one gossip setting of the profile (repeatable)")
    s.add_argument("--trials", type=_positive_int, default=None,
                   help="catalog: registrations, one after another; detect: victims, "
                   "one after another (at most nodes - 2; default 10)")
    s.add_argument("--flips", type=_positive_int, default=None,
                   help="catalog: health flips after the registrations (default: as many)")
    s.add_argument("--split-fraction", type=_fraction, default=0.5)
    s.add_argument("--asymmetric", action="store_true",
                   help="partition: only traffic from side A to side B is lost")
    t = s.add_argument_group("traffic", "options of the traffic scenario (--seed and "
                             "--duration too; default 30 measured seconds)")
    t.add_argument("--rate", type=_positive_float, default=1000.0,
                   help="requests per second, open loop (default 1000)")
    t.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    t.add_argument("--warmup", type=float, default=2.0,
                   help="seconds sent but not measured first (default 2, as the harness)")
    t.add_argument("--variant", default="fixed50", metavar="NAME[=D1,D2,...]",
                   help="instance behaviours: healthy, fixed50, tail10x200 (the shared "
                   "harness's slow-backend variants), failing503, failingreset, "
                   "saturated, or NAME=D1,D2,... with Di = delay_ms[:slow_fraction:"
                   "slow_ms][+503=F][+reset=F][+conc=N]")
    t.add_argument("--balancers", type=lambda x: tuple(b for b in x.split(",") if b),
                   default=("peak_ewma", "least_request", "round_robin", "random"),
                   metavar="B1,B2,...", help="default peak_ewma,least_request,"
                   "round_robin,random; hash too with --hash-keys")
    t.add_argument("--hop-ms", type=float, default=0.15,
                   help="one sidecar's time per request, a single-threaded FIFO server "
                   "(default 0.15: the pair adds ~0.3 ms at c=1)")
    t.add_argument("--hop-dist", choices=("fixed", "exp"), default="fixed",
                   help="a sidecar's time per request: always --hop-ms, or exponential "
                   "with that mean")
    t.add_argument("--backend-ms", type=float, default=0.05,
                   help="an instance's own time per request before added delays")
    t.add_argument("--attempts", type=_positive_int, default=None,
                   help="tries per request in all (default: the policy's, 3; 1: no retries)")
    t.add_argument("--fault-delay", default=None, metavar="MS:PERCENT",
                   help="a fault policy: hold PERCENT of the requests MS at the caller "
                   "before balancing (counts toward the overall timeout)")
    t.add_argument("--fault-abort", default=None, metavar="STATUS:PERCENT",
                   help="a fault policy: answer PERCENT of the requests with STATUS "
                   "(400-599) at the caller, or reset:PERCENT; never retried")
    t.add_argument("--rate-limit", default=None, metavar="R[:BURST_S]",
                   help="a mesh-wide rate limit of R req/s (burst 1 s): each instance's "
                   "callee sidecar admits R*w/W and answers 429 beyond")
    t.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="the instances' registered weights (default all 1; 0 drains one)")
    t.add_argument("--hash-keys", type=int, default=0, metavar="N",
                   help="each request carries one of N keys, for the hash balancer "
                   "(--balancers hash,...)")
    t.add_argument("--hash-dist", choices=("zipf", "uniform"), default="zipf",
                   help="how the keys are drawn: zipf (key k with probability ~ 1/k, "
                   "the default) or uniform")
    s.add_argument("--json", action="store_true",
                   help="print the report as one JSON object on stdout")
    s.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write PNG plots there (needs matplotlib)")
    s.add_argument("--explain", default=None, metavar="MEMBER",
                   help="after the run, print the story of MEMBER's suspicion from every "
                   "node's history, as `rumor explain` tells it (MEMBER `victim`: the "
                   "first node a crash scenario killed)")
    s.add_argument("--progress", action="store_true",
                   help="show a progress bar even when stderr is not a terminal")


def params_from_args(args: argparse.Namespace) -> Params:
    from .scenarios import Params
    if args.scenario == "traffic":
        extra: dict[str, Any] = {
            "rate": args.rate, "arrivals": args.arrivals, "warmup": args.warmup,
            "variant": args.variant, "balancers": args.balancers, "hop_ms": args.hop_ms,
            "hop_dist": args.hop_dist,
            "backend_ms": args.backend_ms, "attempts": args.attempts,
            "fault_delay": args.fault_delay, "fault_abort": args.fault_abort,
            "rate_limit": args.rate_limit, "hash_keys": args.hash_keys,
            "hash_dist": args.hash_dist}
        if args.weights is not None:
            from .traffic import parse_weights
            extra["weights"] = parse_weights(args.weights)
        return Params(seed=args.seed, duration=args.duration, extra=extra)
    trials = args.trials if args.trials is not None else (10 if args.scenario == "detect"
                                                          else 200)
    p = Params(nodes=args.nodes, seed=args.seed, loss=args.loss or 0.0,
               duration=args.duration, profile=args.profile,
               lifeguard=not args.no_lifeguard, latency=args.latency, warm=not args.cold,
               crashes=args.crashes, slow_fraction=args.slow_fraction,
               mean_pause=args.mean_pause, mean_run=args.mean_run,
               split_fraction=args.split_fraction, asymmetric=args.asymmetric,
               extra={"trials": trials, "flips": args.flips or trials},
               tune=tuple(args.tune), node_identity=args.node_identity,
               reliable_streams=args.reliable_streams)
    if args.sweep is not None:
        p.sweep = args.sweep
    elif args.loss is not None:
        p.sweep = (args.loss,)
    return p


def run_sim_command(args: argparse.Namespace) -> int:
    try:
        p = params_from_args(args)
        from .network import parse_latency
        if p.latency:
            parse_latency(p.latency)
        from .scenarios import gossip_config
        gossip_config(p)
        if args.scenario == "traffic":
            from .traffic import traffic_params
            traffic_params(p).validate()
    except ValueError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return 2
    bar = None
    if args.progress or sys.stderr.isatty():
        from .report import ProgressBar
        bar = ProgressBar(args.scenario)
    from .scenarios import SCENARIOS, capture_sims
    try:
        with capture_sims() as sims:
            report = SCENARIOS[args.scenario](p, bar)
    finally:
        if bar is not None:
            bar.close()
    if args.plots is not None:
        from .plots import available, write_plots
        if available():
            files = write_plots(report, args.plots)
            report["plots"] = [str(f) for f in files]
        else:
            report["plots"] = []
            print("rumor: plots skipped: matplotlib is not installed "
                  "(pip install matplotlib)", file=sys.stderr)
    from .report import summary
    if args.json:
        json.dump(report, sys.stdout, sort_keys=False)
        sys.stdout.write("\n")
        print(summary(report), file=sys.stderr)
    else:
        print(summary(report))
    if getattr(args, "explain", None):
        return _print_explain(args.explain, report, sims,
                              sys.stderr if args.json else sys.stdout)
    return 0


def _print_explain(member: str, report: dict[str, Any], sims: list[Any], out: Any) -> int:
    from .scenarios import explain
    if member == "victim":
        victims = report.get("result", {}).get("victims") or []
        if not victims:
            print("rumor: --explain victim: this scenario crashed no node", file=sys.stderr)
            return 2
        member = victims[0]
    if not sims:
        print(f"rumor: --explain: the {report['scenario']} scenario runs no gossip cluster",
              file=sys.stderr)
        return 2
    sim = sims[-1]
    if member not in sim.by_name:
        print(f"rumor: --explain: no node named {member!r} (nodes are n0..n"
              f"{len(sim.nodes) - 1})", file=sys.stderr)
        return 2
    from ..gossip.explain import format_story
    s, timeline = explain(sim, member)
    print("", file=out)
    print(format_story(s, timeline, clock=lambda t: f"virtual {t:.3f}s"), file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m rumor.simulations.cli SCENARIO ...`` until ``rumor sim`` is wired."""
    parser = argparse.ArgumentParser(prog="rumor")
    sub = parser.add_subparsers(dest="command")
    add_sim_parser(sub)
    args = parser.parse_args(["sim", *(sys.argv[1:] if argv is None else argv)])
    return run_sim_command(args)


if __name__ == "__main__":
    sys.exit(main())
