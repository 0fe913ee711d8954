# layer: shell — the command: runs trio, prints, reads the ledgers
"""``rumor lab``: the simulator's scenarios on real agents in network namespaces.

    rumor lab SCENARIO [options]           run it, print the report (--json, --plots)
    rumor lab compare SCENARIO [options]   run it in the lab and in the simulator
    rumor lab clean [LAB ...] [--all]      undo what a killed lab left (from its ledger)
    rumor lab list                         the labs whose ledgers are on this machine

Wire it with ``add_lab_parser(subparsers)``; ``args.command == "lab"`` goes to
``run_lab_command(args)``. Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...gossip.config import PROFILES
from ..cli import _fraction, _positive_int, _sweep

if TYPE_CHECKING:
    from ..scenarios import Params

#: As ``rumor sim``'s names (the lab has no policy, catalog or traffic scenario yet:
#: those run no membership faults); tests check them against ``LAB_SCENARIOS``.
LAB_SCENARIO_NAMES = ("churn", "converge", "crash", "detect", "loss", "partition", "slow")
ACTIONS = (*LAB_SCENARIO_NAMES, "compare", "clean", "list")


def _host_delay(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected HOST=SPEC (e.g. n3=fixed:0.02), got "
                                         f"{text!r}")
    return name, spec


def add_lab_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    s = subparsers.add_parser(
        "lab", help="run a chaos scenario on real agents in network namespaces (root)",
        description="Build a network of Linux namespaces on one machine (one agent per "
        "namespace on a private bridge, 10.211.0.0/16 and fd00:211::/64), run real "
        "`rumor agent`s in it, and apply the scenario's faults with the kernel: nftables "
        "for loss and partitions, signals for crashes and stops, an NFQUEUE delay line "
        "for latency. Scenarios and report as `rumor sim`. Everything the lab creates "
        "is written to a ledger first (/run/rumor-lab) and removed at the end, also "
        "after Ctrl-C, SIGTERM or SIGHUP; after kill -9, `rumor lab clean` removes it. "
        "Needs root.")
    s.add_argument("action", choices=ACTIONS, metavar="SCENARIO|compare|clean|list",
                   help="a scenario (" + ", ".join(LAB_SCENARIO_NAMES) + "), or compare "
                   "SCENARIO, clean [LAB...], list")
    s.add_argument("targets", nargs="*", metavar="ARG",
                   help="compare: the scenario; clean: lab ids (default: every lab whose "
                   "process is gone)")
    s.add_argument("--nodes", type=_positive_int, default=5)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--loss", type=_fraction, default=None,
                   help="packet loss on every link (loss: run just this rate)")
    s.add_argument("--loss-protocols", choices=("all", "udp", "tcp"), default="all",
                   help="what the loss drops (default all: UDP and TCP)")
    s.add_argument("--sweep", type=_sweep, default=None, metavar="L1,L2,...")
    s.add_argument("--duration", type=float, default=None,
                   help="seconds of the measured phase (scenario default)")
    s.add_argument("--profile", choices=sorted(PROFILES), default="lan")
    s.add_argument("--no-lifeguard", action="store_true")
    s.add_argument("--tune", action="append", default=[], metavar="NAME=VALUE")
    s.add_argument("--crashes", type=_positive_int, default=1)
    s.add_argument("--trials", type=_positive_int, default=None,
                   help="detect: victims, one after another (default 10)")
    s.add_argument("--slow-fraction", type=_fraction, default=0.02)
    s.add_argument("--mean-pause", type=float, default=8.0,
                   help="slow: mean SIGSTOP spell (s); shorter and longer than the probe "
                   "interval are both worth a run")
    s.add_argument("--mean-run", type=float, default=8.0)
    s.add_argument("--split-fraction", type=_fraction, default=0.5)
    s.add_argument("--split-for", type=float, default=None,
                   help="partition: seconds split (default: the detection bound + 10)")
    s.add_argument("--asymmetric", action="store_true",
                   help="partition: one way only (side A's packets to side B are lost)")
    s.add_argument("--ipv6", action="store_true",
                   help="agents gossip over IPv6 (bind [::], advertise fd00:211::N)")
    s.add_argument("--delay", default=None, metavar="SPEC",
                   help="one-way delay on every host's egress through the delay line "
                   "(fixed:D, uniform:LO:HI, lognormal:MEDIAN:SIGMA, seconds)")
    s.add_argument("--host-delay", type=_host_delay, action="append", default=[],
                   metavar="HOST=SPEC", help="extra egress delay of one host (n3=...)")
    s.add_argument("--no-sidecar", action="store_true",
                   help="agents without their inbound/outbound listeners")
    s.add_argument("--sim-seeds", type=_positive_int, default=None,
                   help="compare: simulated runs pooled (default 10 for detect, else 5)")
    s.add_argument("--all", action="store_true", help="clean: every lab, even running")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plots", type=Path, default=None, metavar="DIR")
    s.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def lab_params(args: argparse.Namespace, scenario: str) -> Params:
    from ..network import parse_latency
    from ..scenarios import Params
    for spec in [args.delay, *(s for _, s in args.host_delay)]:
        if spec is not None:
            parse_latency(spec)
    p = Params(nodes=args.nodes, seed=args.seed, loss=args.loss or 0.0,
               duration=args.duration, profile=args.profile,
               lifeguard=not args.no_lifeguard, warm=False, crashes=args.crashes,
               slow_fraction=args.slow_fraction, mean_pause=args.mean_pause,
               mean_run=args.mean_run, split_fraction=args.split_fraction,
               asymmetric=args.asymmetric, split_for=args.split_for,
               tune=tuple(args.tune), latency=args.delay,
               extra={"trials": args.trials or 10, "family": 6 if args.ipv6 else 4,
                      "sidecar": not args.no_sidecar,
                      "loss_protocols": None if args.loss_protocols == "all"
                      else [args.loss_protocols],
                      "delay": args.delay, "host_delay": dict(args.host_delay)})
    if args.sweep is not None:
        p.sweep = args.sweep
    elif args.loss is not None:
        p.sweep = (args.loss,)
    if scenario == "slow":
        p.extra["sigstop"] = True
    return p


def _say(args: argparse.Namespace) -> Any:
    if args.quiet:
        return None
    return lambda msg: print(f"rumor lab: {msg}", file=sys.stderr, flush=True)


def run_lab_command(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list()
    if args.action == "clean":
        return _clean(args.targets, args.all)
    # A lab that will not stop says where: `kill -USR1 PID` (threads), `-USR2` (tasks).
    from .stuck import install
    install()
    scenario = args.action
    if args.action == "compare":
        if len(args.targets) != 1 or args.targets[0] not in LAB_SCENARIO_NAMES:
            print("rumor lab compare: name one scenario: " + ", ".join(LAB_SCENARIO_NAMES),
                  file=sys.stderr)
            return 2
        scenario = args.targets[0]
    elif args.targets:
        print(f"rumor lab {scenario}: unexpected arguments {args.targets}", file=sys.stderr)
        return 2
    try:
        p = lab_params(args, scenario)
        from ..scenarios import gossip_config
        gossip_config(p)
    except ValueError as e:
        print(f"rumor lab: {e}", file=sys.stderr)
        return 2
    from .kernel import LabError, why_not_here
    reason = why_not_here()
    if reason is not None:
        print(f"rumor lab: {reason}", file=sys.stderr)
        return 1
    import trio
    try:
        report = trio.run(_run_until_stopped, scenario, p, _say(args))
    except BaseException as e:  # trio's nurseries wrap what they raise in groups
        leaves = _leaves(e)
        if any(isinstance(x, KeyboardInterrupt) for x in leaves):
            print("rumor lab: interrupted; the lab was cleaned up", file=sys.stderr)
            return 130
        stops = [x for x in leaves if isinstance(x, StoppedBySignal)]
        if stops:
            print(f"rumor lab: {stops[0]}; the lab was cleaned up", file=sys.stderr)
            return 128 + stops[0].signum
        if leaves and all(isinstance(x, LabError) for x in leaves):
            for x in leaves:
                print(f"rumor lab: {x}", file=sys.stderr)
            return 1
        raise
    if args.action == "compare":
        return _compare(args, scenario, p, report)
    return _emit(args, report)


class StoppedBySignal(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


#: Stop and tear down as on Ctrl-C: `kill`, `systemctl stop`, `timeout` and a closed
#: terminal would otherwise end the lab with its namespaces and agents left behind.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def _run_until_stopped(scenario: str, p: Params,
                             say: Callable[[str], None] | None) -> dict[str, Any]:
    """The scenario in this (the main) task, so Ctrl-C reaches it as before; a stop
    signal raises StoppedBySignal beside it, which cancels it through its teardown."""
    import trio

    from .scenarios import run_scenario

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for signum in signals:
                raise StoppedBySignal(signum)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        report = await run_scenario(scenario, p, _ledger_dir(), say)
        nursery.cancel_scope.cancel()
    return report


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in _leaves(sub)]
    return [e]


def _ledger_dir() -> Path:
    from .ledger import DEFAULT_DIR
    return DEFAULT_DIR


def _emit(args: argparse.Namespace, report: dict[str, Any]) -> int:
    if args.plots is not None:
        from ..plots import available, write_plots
        if available():
            report["plots"] = [str(f) for f in write_plots(report, args.plots)]
        else:
            report["plots"] = []
            print("rumor lab: plots skipped: matplotlib is not installed", file=sys.stderr)
    from ..report import summary
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        print(summary(report), file=sys.stderr)
    else:
        print(summary(report))
    return 0


def sim_reports(scenario: str, p: Params, seeds: int) -> list[dict[str, Any]]:
    """The simulator on the lab's parameters: cold start as the lab, SIGSTOP as the
    lab's slow scenario, the lab's delay as the network's latency, seeds p.seed ..."""
    from dataclasses import replace

    from ...gossip.version import RELEASE_TAG, release
    from ..scenarios import SCENARIOS
    from .cluster import INBOUND_PORT
    # The tags every real agent announces, so both sides gossip the same member states.
    meta = {RELEASE_TAG: release()}
    if p.extra.get("sidecar", True):
        meta["rumor.inbound"] = f"{{host}}:{INBOUND_PORT}"
    out = []
    for i in range(seeds):
        q = replace(p, seed=p.seed + i, warm=False, extra=dict(p.extra, node_meta=meta))
        out.append(SCENARIOS[scenario](q, None))
    return out


def pooled(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report whose trials are every report's and whose other figures are the
    first's (detect pools its trials; other scenarios compare one run per side)."""
    first = dict(reports[0])
    res = dict(first["result"])
    if "trials" in res:
        res["trials"] = [t for r in reports for t in r["result"]["trials"]]
    first["result"] = res
    return first


def _compare(args: argparse.Namespace, scenario: str, p: Params,
             lab: dict[str, Any]) -> int:
    from .compare import rows, table
    seeds = args.sim_seeds or (10 if scenario == "detect" else 1)
    sims = sim_reports(scenario, p, seeds)
    sim = pooled(sims)
    got = rows(scenario, lab, sim)
    doc = {"scenario": scenario, "nodes": p.nodes, "seed": p.seed, "profile": p.profile,
           "delay": p.latency, "sim_seeds": seeds, "rows": got, "lab": lab, "sim": sim}
    if args.json:
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(table(scenario, got, f"rumor lab compare {scenario}: {p.nodes} nodes, seed "
                    f"{p.seed}, profile {p.profile}, delay {p.latency or 'none'}; the "
                    f"simulator over {seeds} seed(s)"))
    return 0


def _list() -> int:
    from .ledger import LedgerError, ledgers
    try:
        found = ledgers(_ledger_dir())
    except LedgerError as e:
        print(f"rumor lab: {e}", file=sys.stderr)
        return 1
    for led in found:
        head = led.entries[0]
        state = "running" if led.owner_alive else "left behind (rumor lab clean)"
        spaces = sum(1 for e in led.entries if e["kind"] == "netns")
        print(f"{led.lab}  {head.get('scenario') or '-'}  {spaces} namespaces  {state}")
    if not found:
        print("no labs")
    return 0


def _clean(targets: list[str], everything: bool) -> int:
    from .kernel import why_not_here
    from .ledger import LedgerError, ledgers
    reason = why_not_here()
    if reason is not None:
        print(f"rumor lab: {reason}", file=sys.stderr)
        return 1
    try:
        found = ledgers(_ledger_dir())
    except LedgerError as e:
        print(f"rumor lab: {e}", file=sys.stderr)
        return 1
    unknown = set(targets) - {led.lab for led in found}
    if unknown:
        print(f"rumor lab clean: no ledger for {', '.join(sorted(unknown))}",
              file=sys.stderr)
        return 1
    cleaned = 0
    for led in found:
        if targets and led.lab not in targets:
            continue
        if led.owner_alive and not everything and not targets:
            print(f"{led.lab}: still running (name it, or --all, to clean it anyway)")
            continue
        try:
            done = led.clean()
        except LedgerError as e:
            print(f"rumor lab: {e}", file=sys.stderr)
            return 1
        cleaned += 1
        print(f"{led.lab}: " + ("; ".join(done) if done else "nothing was left"))
    if not cleaned:
        print("nothing to clean")
    return 0
