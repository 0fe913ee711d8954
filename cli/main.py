"""The ``rumor`` command.

Every subcommand either does its job or prints one line saying what went wrong and
exits non-zero; a traceback means a bug in rumor, never an operator mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..gossip.address import format_address, parse_address
from ..gossip.config import PROFILES, profile
from ..gossip.wire import Address

DEFAULT_BIND = "127.0.0.1:7946"
DEFAULT_API = "127.0.0.1:7947"
DEFAULT_DNS = "127.0.0.1:8600"
DEFAULT_OUTBOUND = "127.0.0.1:15001"
DEFAULT_INBOUND_PORT = 15002


class UsageError(Exception):
    """Bad arguments; printed as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong and where to look),
    not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


class _VersionAction(argparse.Action):
    """--version, computed only when asked (reading package metadata costs start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from ..gossip.version import describe
        print(describe())
        parser.exit()


def _address(default_port: int | None = None) -> type:
    """An argparse ``type`` that parses HOST:PORT with a readable error."""
    def parse(text: str) -> Address:
        try:
            return parse_address(text, default_port=default_port)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "address"
    return parse  # type: ignore[return-value]


def _seed(text: str) -> str:
    """``--join``: checked as HOST:PORT now, kept as text (a host name is resolved when
    the agent joins)."""
    try:
        parse_address(text, default_port=7946)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _upstream(text: str) -> Any:
    """``--upstream SERVICE=HOST:PORT`` (proxy/tcp_spec.py)."""
    from ..proxy.tcp_spec import parse_upstream
    try:
        return parse_upstream(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio from 0 to 1, got {text!r}")
    return value


def _otlp(url: str | None) -> str | None:
    if url is None:
        return None
    from ..proxy.otlp import traces_url  # the exporter's imports only when it is asked for
    try:
        return traces_url(url)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _connections(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 < value < 10_000_000:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _ttl(text: str) -> int:
    from ..proxy.api.dns import MAX_TTL
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {text!r}") from None
    if not 0 <= value <= MAX_TTL:
        raise argparse.ArgumentTypeError(
            f"expected 0 to {MAX_TTL} seconds (a day), got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _service_spec(text: str) -> Any:
    """An argparse ``type`` for ``--service``: the parsed registration, or one line
    naming the bad field."""
    from ..gossip.service_spec import SpecError, parse_spec
    try:
        return parse_spec(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rumor", description="rumor: a decentralized service mesh (gossip membership, "
        "signed policies, latency-aware sidecar).")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    a = sub.add_parser("agent", help="run an agent in the foreground")
    a.add_argument("--name", default=socket.gethostname(),
                   help="unique member name (default: the host name)")
    a.add_argument("--bind", type=_address(7946), default=DEFAULT_BIND,
                   help=f"gossip address, UDP and TCP (default {DEFAULT_BIND})")
    a.add_argument("--advertise", type=_address(7946), default=None,
                   help="address other members use to reach this one (default: --bind)")
    a.add_argument("--api", type=_address(7947), default=DEFAULT_API,
                   help=f"local HTTP API address (default {DEFAULT_API})")
    a.add_argument("--join", action="append", type=_seed, default=[], metavar="HOST:PORT",
                   help="seed to join through (repeatable; host names allowed)")
    a.add_argument("--retry-join", action="append", type=_address(7946), default=[],
                   metavar="HOST:PORT", help="seed to keep trying in the background, "
                   "forever, until one answers (repeatable; for agents that start before "
                   "their seeds; the agent serves meanwhile)")
    a.add_argument("--retry-interval", type=_positive_float, default=30.0,
                   metavar="SECONDS", help="longest wait between --retry-join rounds "
                   "(default 30; the first waits are 1, 2, 4, ... s, less a random 20%%)")
    a.add_argument("--rejoin-after-leave", action="store_true",
                   help="rejoin through the --data-dir member snapshot at start even "
                   "after a graceful leave (by default only after a crash or kill)")
    a.add_argument("--profile", choices=sorted(PROFILES), default="lan",
                   help="timing profile: lan (default, memberlist LAN), wan, local (loopback)")
    a.add_argument("--tag", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="metadata tag gossiped with this member (repeatable)")
    a.add_argument("--service", action="append", type=_service_spec, default=[],
                   metavar="SPEC", help="announce a local service, e.g. name=web,port=8080,"
                   "version=v2,tags=blue|canary,check=http://127.0.0.1:8080/healthz,"
                   "interval=5s (repeatable; see docs/catalog.md)")
    a.add_argument("--config", action="append", default=[], metavar="PATH",
                   help="TOML file, or a directory of *.toml files read in name order, "
                   "giving any of these options (keys: the long flag names with _ for -, "
                   "e.g. join = [...]) and [[service]] tables; repeatable; flags given "
                   "here replace the files' values and add to their lists "
                   "(see docs/configuration.md)")
    a.add_argument("--dns", nargs="?", const=DEFAULT_DNS, type=_address(8600), default=None,
                   metavar="HOST:PORT", help="answer DNS for *.service.rumor over UDP and "
                   f"TCP (default address {DEFAULT_DNS} when given without one)")
    a.add_argument("--dns-service-ttl", type=_ttl, default=0, metavar="SECONDS",
                   help="TTL of DNS answers for services (NAME.service.rumor; default 0: "
                   "resolvers ask again every time)")
    a.add_argument("--dns-node-ttl", type=_ttl, default=0, metavar="SECONDS",
                   help="TTL of DNS answers for nodes (NODE.node.rumor; default 0)")
    a.add_argument("--outbound", nargs="?", const=DEFAULT_OUTBOUND, type=_address(15001),
                   default=None, metavar="HOST:PORT",
                   help="listen for this host's outgoing HTTP (Host: SERVICE or as "
                   f"HTTP_PROXY); default address {DEFAULT_OUTBOUND} when given alone")
    a.add_argument("--inbound", nargs="?", const="", type=str, default=None,
                   metavar="HOST:PORT", help="listen for other sidecars' requests to this "
                   "host's services (advertised to the cluster); default: the gossip "
                   "host, port 15002, when given alone")
    a.add_argument("--upstream", action="append", default=[], type=_upstream,
                   metavar="SERVICE=HOST:PORT", help="listen on HOST:PORT for this host's "
                   "TCP connections to SERVICE (a service registered protocol=tcp), each "
                   "carried to one of its instances; repeatable (docs/proxy.md)")
    a.add_argument("--tcp-idle-timeout", type=_positive_float, default=3600.0,
                   metavar="SECONDS", help="close a relayed TCP connection after this long "
                   "without a byte either way (upstream ports and the inbound; default 3600)")
    a.add_argument("--identity", metavar="SERVICE",
                   help="the service this host calls as (x-rumor-source; default: its "
                   "local service when it runs exactly one)")
    a.add_argument("--balancer-decay", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="how fast the outbound balancer forgets latency (peak-EWMA time "
                   "constant, default 10)")
    for side, who, share in (("inbound", "other sidecars", "a quarter, at most 1024"),
                             ("outbound", "local applications", "three quarters")):
        a.add_argument(f"--{side}-connections", type=_connections, default=0, metavar="N",
                       help=f"connections the {side} listener holds at once, from {who} "
                       "(default: its share of the descriptor limit; docs/proxy.md)")
        a.add_argument(f"--{side}-per-client", type=_connections, default=0, metavar="N",
                       help=f"connections at once from one address to the {side} "
                       f"listener, below --{side}-connections (default: {share} of it)")
    a.add_argument("--first-byte-timeout", type=_positive_float, default=5.0,
                   metavar="SECONDS", help="close a sidecar connection that sends no "
                   "request byte this long after it was accepted (default 5)")
    a.add_argument("--access-log", metavar="FILE",
                   help="write one JSON line per proxied request to FILE ('-': stdout)")
    a.add_argument("--otlp", metavar="URL",
                   help="export a span per proxied request to this OpenTelemetry collector "
                   "(OTLP/HTTP protobuf; URL without a path gets /v1/traces; docs/tracing.md)")
    a.add_argument("--trace-sample", type=_ratio, default=1.0, metavar="RATIO",
                   help="share of new traces sampled, 0 to 1 (default 1); a request that "
                   "carries a traceparent keeps its caller's decision")
    a.add_argument("--trust-key", action="append", default=[], metavar="FILE",
                   help="public key of a trusted policy publisher (repeatable; without one "
                   "the agent accepts no policy documents)")
    a.add_argument("--trust-threshold", type=int, default=1, metavar="K",
                   help="distinct trusted signatures a policy needs (default 1)")
    a.add_argument("--data-dir", metavar="DIR",
                   help="what the agent keeps across restarts: the members it knew "
                   "(DIR/members.json, rejoined through when no --join seed answers) "
                   "and accepted policy documents (DIR/policies/)")
    a.add_argument("--node-identity", choices=("auto", "off", "prefer", "require"),
                   default="auto", help="sign this agent's word about itself and take "
                   "only signed word about others: prefer (signed and plain, for a cluster "
                   "that upgrades), require (signed only), off; auto (default): prefer "
                   "when DIR/node.credential exists or --node-tofu is given")
    a.add_argument("--node-tofu", action="store_true",
                   help="plaintext clusters: bind a member's name to the key it presents "
                   "first, in its own push-pull (trust on first use)")
    a.add_argument("--node-ca", metavar="FILE",
                   help="the CA certificate that signs node credentials (default: "
                   "--tls-ca)")
    a.add_argument("--node-cluster", metavar="NAME",
                   help="the cluster named by node credentials signed with the policy "
                   "trust keys (`rumor policy credential`) when there is no CA")
    a.add_argument("--tls-ca", metavar="FILE", help="cluster CA certificate (`rumor ca "
                   "init`): with --tls-cert/--tls-key, mutual TLS 1.3 between sidecars")
    a.add_argument("--tls-cert", metavar="FILE",
                   help="this agent's certificate chain (`rumor ca issue`), reloaded when "
                   "renewed")
    a.add_argument("--tls-key", metavar="FILE", help="this agent's private key")
    a.add_argument("--keyring", metavar="FILE",
                   help="encrypt gossip with these keys (base64, one per line, the first "
                   "sends; `rumor keyring generate` makes one); keyring commands rewrite "
                   "the file")
    a.add_argument("--api-token-file", metavar="FILE",
                   help="require the token in FILE (one line) for every change through "
                   "the API (Authorization: Bearer TOKEN; the CLI's --token-file)")
    a.add_argument("--api-allow-host", action="append", default=[], metavar="NAME",
                   help="a host name the API answers to besides loopback and localhost "
                   "(repeatable; guards against DNS rebinding)")
    a.add_argument("--tune", action="append", default=[], metavar="NAME=VALUE",
                   help="override one gossip setting of the profile (repeatable; the "
                   "names are GossipConfig's, e.g. user_retransmit_mult=4): for "
                   "experiments and unusual networks")
    a.add_argument("--trace-gossip", metavar="FILE",
                   help="diagnostics: append every application message this agent sends "
                   "or receives (digest, peer, monotonic time) to FILE as JSON lines")
    a.add_argument("--log-format", choices=["text", "json"], default="text")
    a.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info")

    m = sub.add_parser("members", help="list the members an agent knows")
    _api_arg(m)
    m.add_argument("--json", action="store_true", help="print the JSON list")
    m.add_argument("--status", choices=["alive", "suspect", "failed", "left"],
                   help="only members with this status")

    from .query_cmd import add_query_parser
    add_query_parser(sub, _api_arg)
    from .explain_cmd import add_explain_parser
    add_explain_parser(sub, _api_arg)
    from .stat_cmd import add_stat_parsers
    add_stat_parsers(sub, _api_arg)
    from .tap_cmd import add_tap_parser
    add_tap_parser(sub, _api_arg)

    sv = sub.add_parser("services", help="list the services in an agent's catalog")
    _api_arg(sv)
    sv.add_argument("--json", action="store_true", help="print the JSON document")

    rs = sub.add_parser("resolve", help="list the instances of a service, nearest first")
    _api_arg(rs)
    rs.add_argument("service", metavar="NAME")
    rs.add_argument("--tag", help="only instances with this tag")
    rs.add_argument("--version", dest="svc_version", metavar="VERSION",
                    help="only instances of this version")
    rs.add_argument("--passing", action="store_true", help="only passing instances")
    rs.add_argument("--critical", action="store_true", help="include critical instances")
    rs.add_argument("--json", action="store_true", help="print the JSON list")

    j = sub.add_parser("join", help="ask a running agent to join more seeds")
    _api_arg(j)
    j.add_argument("addrs", nargs="+", metavar="HOST:PORT")

    lv = sub.add_parser("leave", help="ask a running agent to leave gracefully and exit")
    _api_arg(lv)

    d = sub.add_parser("demo", help="run a 5-agent cluster on loopback and show "
                       "service discovery, failure detection and rejoin")
    d.add_argument("--agents", type=int, default=5)

    from ..simulations.cli import add_sim_parser
    add_sim_parser(sub)
    from ..simulations.lab.cli import add_lab_parser
    add_lab_parser(sub)
    from .policy_cmd import add_policy_parsers
    add_policy_parsers(sub, _api_arg)
    from .keyring_cmd import add_keyring_parser
    add_keyring_parser(sub, _api_arg)
    from .ca_cmd import add_ca_parser
    add_ca_parser(sub)
    from .config_cmd import add_config_parser
    add_config_parser(sub, _api_arg)
    return p


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``rumor agent``'s, to read its options)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def parse_agent_args(argv: Sequence[str]) -> argparse.Namespace:
    """``rumor agent`` arguments with its ``--config`` files merged under the flags.

    Raises ``UsageError`` (or exits, as argparse does, for a bad flag)."""
    from .config import ConfigError, apply, load, settings
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "agent":
        return args
    agent = subparser(parser, "agent")
    if args.config:
        try:
            files = load(args.config, agent)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        args = apply(parser, agent, argv, files)
        args.config_files = files.files
        # Which file gave a value the command line did not: an error about it names
        # the file and key rather than a flag the operator never typed.
        given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        args.config_origin = {dest: path for dest, path in files.origin.items()
                              if "--" + dest.replace("_", "-") not in given}
    else:
        args.config_files = []
        args.config_origin = {}
    args.argv = list(argv)  # what a reload reads again
    args.settings = settings(args, agent)  # as a file spells them (config show)
    return args


def _api_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", type=_address(7947), default=DEFAULT_API,
                   help=f"agent API address (default {DEFAULT_API})")
    p.add_argument("--token-file", metavar="FILE",
                   help="send the API token in FILE (the agent's --api-token-file; "
                   "or set RUMOR_API_TOKEN_FILE or RUMOR_API_TOKEN)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_agent_args(argv)
    except UsageError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        build_parser().print_help()
        return 2
    if getattr(args, "token_file", None):
        from .client import use_token_file
        use_token_file(args.token_file)
    try:
        return int(_dispatch(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `rumor ... | head`: the reader left; not our error. Point stdout at /dev/null
        # so the interpreter's final flush does not fail again (Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UsageError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "agent":
        return _agent(args)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(agents=args.agents)
    if args.command == "sim":
        from ..simulations.cli import run_sim_command
        return run_sim_command(args)
    if args.command == "lab":
        from ..simulations.lab.cli import run_lab_command
        return run_lab_command(args)
    from .client import ApiError, get_json, put_json
    if args.command in ("keygen", "policy"):
        from .policy_cmd import CommandError, run_keygen, run_policy
        try:
            if args.command == "keygen":
                return run_keygen(args)
            return run_policy(args, format_address(args.api) if "api" in args else "")
        except (CommandError, ApiError) as e:
            print(f"rumor: {e}", file=sys.stderr)
            return 1
    if args.command == "ca":
        from .ca_cmd import run_ca
        return run_ca(args)
    if args.command == "keyring":
        from .keyring_cmd import run_keyring
        return run_keyring(args, format_address(args.api) if "api" in args else "")
    if args.command == "config":
        from .config_cmd import run_config
        return run_config(args)
    if args.command == "reload":
        from .config_cmd import run_reload
        return run_reload(args)
    api = format_address(args.api)
    try:
        if args.command == "members":
            members = get_json(api, "/v1/members")
            if args.status:
                members = [m for m in members if m["status"] == args.status]
            if args.json:
                print(json.dumps(members, indent=2))
            else:
                from .table import render_table
                rows = [{"name": m["name"], "addr": m["addr"], "status": m["status"],
                         "incarnation": m["incarnation"],
                         "rtt_ms": "" if m.get("rtt_ms") is None else f"{m['rtt_ms']:.2f}",
                         "tags": ",".join(f"{k}={v}" for k, v in sorted(m["tags"].items()))}
                        for m in members]
                print(render_table(rows, ["name", "addr", "status", "incarnation", "rtt_ms",
                                          "tags"]))
            return 0
        if args.command == "services":
            return _services(api, args.json)
        if args.command == "query":
            from .query_cmd import run_query
            return run_query(args)
        if args.command == "explain":
            from .explain_cmd import run_explain
            return run_explain(args)
        if args.command == "tap":
            from .tap_cmd import run_tap
            return run_tap(args)
        if args.command in ("stat", "edges", "top"):
            from . import stat_cmd
            run = {"stat": stat_cmd.run_stat, "edges": stat_cmd.run_edges,
                   "top": stat_cmd.run_top}[args.command]
            return run(args)
        if args.command == "resolve":
            return _resolve(api, args)
        if args.command == "join":
            for a in args.addrs:
                try:
                    parse_address(a)
                except ValueError as e:
                    raise UsageError(str(e)) from None
            res = put_json(api, "/v1/join", {"addrs": args.addrs})
            print(f"joined through {res['joined']} of {len(args.addrs)} address(es)")
            return 0
        if args.command == "leave":
            put_json(api, "/v1/leave", {})
            print("the agent is leaving the cluster")
            return 0
    except ApiError as e:
        print(f"rumor: {e}", file=sys.stderr)
        return 1
    raise UsageError(f"unknown command {args.command!r}")


def _services(api: str, as_json: bool) -> int:
    from .client import get_json
    from .table import render_table
    doc = get_json(api, "/v1/catalog/services")
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [{"name": n, "instances": s["instances"], "passing": s["passing"],
             "warning": s["warning"], "critical": s["critical"],
             "versions": s["versions"], "tags": s["tags"]} for n, s in doc.items()]
    print(render_table(rows, ["name", "instances", "passing", "warning", "critical",
                              "versions", "tags"]))
    return 0


def _resolve(api: str, args: argparse.Namespace) -> int:
    from urllib.parse import quote, urlencode

    from .client import get_json
    from .table import render_table
    query: dict[str, str] = {"near": "_agent"}
    if args.tag:
        query["tag"] = args.tag
    if args.svc_version:
        query["version"] = args.svc_version
    if args.passing:
        query["passing"] = "1"
    if args.critical:
        query["critical"] = "1"
    rows = get_json(api, f"/v1/catalog/service/{quote(args.service, safe='')}?"
                    + urlencode(query))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"rumor: no instances of {args.service!r}", file=sys.stderr)
        return 1
    print(render_table(
        [{**r, "address": f"{r['address']}:{r['port']}"} for r in rows],
        ["id", "node", "address", "status", "version", "weight", "rtt_ms", "tags"]))
    return 0


def _agent(args: argparse.Namespace) -> int:
    import signal

    import trio

    from .agent import StartupError, run_agent
    from .logs import configure_logging

    # SIGHUP reloads once the agent runs; until then (a service manager's reload
    # during start-up) it must not kill the process, as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    opts = agent_options(args)
    configure_logging(args.log_format, args.log_level)
    failures: list[BaseException] = []
    try:
        trio.run(run_agent, opts)
    except* StartupError as eg:
        failures.extend(_leaves(eg))
    if failures:
        print(f"rumor: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def agent_options(args: argparse.Namespace) -> Any:
    """The ``AgentOptions`` that ``rumor agent`` ARGS describe (files merged), with
    every key file read and checked; raises ``UsageError`` saying what is wrong (as
    "FILE: key ..." when the value came from a config file)."""
    try:
        return _agent_options(args)
    except UsageError as e:
        raise UsageError(_name_the_file(str(e), getattr(args, "config_origin", {}))) \
            from None


def _name_the_file(message: str, origin: dict[str, str]) -> str:
    """"--trust-key X: ..." -> "FILE: trust_key: X: ..." for a value from FILE."""
    flag = message.split(" ", 1)[0].rstrip(":")
    if not flag.startswith("--"):
        return message
    dest = flag[2:].replace("-", "_")
    if dest not in origin:
        return message
    rest = message[len(flag):].lstrip(":").lstrip()
    return f"{origin[dest]}: {dest}: {rest}"


def _agent_options(args: argparse.Namespace) -> Any:
    from .agent import AgentOptions

    if not args.name or len(args.name) > 128:
        raise UsageError("--name must be 1 to 128 characters")
    services = list(args.service)
    ids = [r.service.id for r in services]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise UsageError(f"service id {dup!r} is registered twice (give id=... to tell "
                         "instances of one service apart)")
    from ..gossip.catalog import (
        CatalogLimitError,
        CatalogLimits,
        check_local_limits,
        registration_size,
    )
    try:
        check_local_limits(len(services), sum(map(registration_size, services)),
                           CatalogLimits(), len(args.name.encode()) + 16)
    except CatalogLimitError as e:
        raise UsageError(f"--service: {e}") from None
    if args.rejoin_after_leave and args.data_dir is None:
        raise UsageError("--rejoin-after-leave needs --data-dir (where the member "
                         "snapshot is kept)")
    try:
        gossip = profile(args.profile).tuned(args.tune)
    except ValueError as e:
        raise UsageError(str(e)) from None
    opts = AgentOptions(name=args.name, bind=args.bind, api=args.api,
                        gossip=gossip, profile=args.profile,
                        advertise=args.advertise, join=args.join,
                        retry_join=list(args.retry_join),
                        retry_interval=args.retry_interval,
                        rejoin_after_leave=args.rejoin_after_leave, tags=dict(args.tag),
                        services=services, dns=_const_address(args.dns),
                        dns_service_ttl=args.dns_service_ttl, dns_node_ttl=args.dns_node_ttl,
                        trust=_trust(args),
                        data_dir=args.data_dir,
                        outbound=_const_address(args.outbound),
                        inbound=_inbound(args), identity=args.identity,
                        upstreams=_upstreams(args), tcp_idle_timeout=args.tcp_idle_timeout,
                        access_log=args.access_log, balancer_decay=args.balancer_decay,
                        otlp=_otlp(args.otlp), trace_sample=args.trace_sample,
                        proxy_limits=_proxy_limits(args),
                        keyring=_keyring(args), keyring_file=args.keyring,
                        tls=_tls_files(args), api_access=_api_access(args),
                        api_token_file=args.api_token_file, trace_gossip=args.trace_gossip,
                        node_identity=args.node_identity, node_tofu=args.node_tofu,
                        node_ca=args.node_ca, node_cluster=args.node_cluster,
                        argv=args.argv, config_files=args.config_files,
                        settings=args.settings)
    return opts


def reread(argv: list[str]) -> Any:
    """The agent's options read again from ``argv`` and its files (a reload); raises
    ``ReloadError`` saying what is wrong, having changed nothing."""
    from .reload import ReloadError
    try:
        return agent_options(parse_agent_args(argv))
    except UsageError as e:
        raise ReloadError(str(e)) from None
    except SystemExit:  # argparse's own exit: the command line itself no longer parses
        raise ReloadError("the agent's command line no longer parses") from None


def _const_address(value: str | Address | None) -> Address | None:
    """argparse does not run ``type`` on an option's ``const``: parse it here."""
    return parse_address(value) if isinstance(value, str) else value


def _upstreams(args: argparse.Namespace) -> list[Any]:
    """The upstream ports, each address bound once."""
    seen: dict[tuple[str, int], Any] = {}
    for up in args.upstream:
        other = seen.setdefault((up.host, up.port), up)
        if other is not up and other != up:
            raise UsageError(f"--upstream {up}: {up.host}:{up.port} is already the port "
                             f"of upstream {other.service}")
    return list(dict.fromkeys(args.upstream))


def _inbound(args: argparse.Namespace) -> Address | None:
    if args.inbound is None:
        return None
    if args.inbound == "":
        return (args.bind[0], DEFAULT_INBOUND_PORT)
    try:
        return parse_address(args.inbound, default_port=DEFAULT_INBOUND_PORT)
    except ValueError as e:
        raise UsageError(f"--inbound: {e}") from None


def _proxy_limits(args: argparse.Namespace) -> Any:
    from ..proxy.limits import SidecarLimits, check_limits
    limits = SidecarLimits(args.inbound_connections, args.outbound_connections,
                           args.inbound_per_client, args.outbound_per_client,
                           args.first_byte_timeout)
    wrong = check_limits(limits)
    if wrong is not None:
        raise UsageError(wrong)
    return limits


def _tls_files(args: argparse.Namespace) -> Any:
    from ..proxy.tls import TlsFiles
    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("mutual TLS needs all three of --tls-ca, --tls-cert and --tls-key")
    if args.inbound is None and args.outbound is None and not args.upstream:
        raise UsageError("--tls-* secure the sidecar's listeners: give --inbound, "
                         "--outbound or --upstream too")
    return TlsFiles(Path(args.tls_ca), Path(args.tls_cert), Path(args.tls_key))


def _keyring(args: argparse.Namespace) -> Any:
    """The agent's gossip keyring from --keyring (None: plaintext gossip)."""
    from ..gossip.keyring import KeyringError
    from ..gossip.keyring_file import load_keyring
    if args.keyring is None:
        return None
    try:
        return load_keyring(Path(args.keyring))
    except KeyringError as e:
        raise UsageError(f"--keyring {e}") from None


def _api_access(args: argparse.Namespace) -> Any:
    """The API's access rules from --api-token-file and --api-allow-host."""
    from ..proxy.api.access import ApiAccess
    from .client import read_token_file
    token = None
    if args.api_token_file is not None:
        try:
            token = read_token_file(args.api_token_file)
        except ValueError as e:
            raise UsageError(f"--api-token-file: {e}") from None
    hosts = set()
    for name in args.api_allow_host:
        from ..gossip.fields import valid_hostname
        if not valid_hostname(name.lower()):
            raise UsageError(f"--api-allow-host: {name!r} is not a host name")
        hosts.add(name.lower())
    return ApiAccess(allowed_hosts=frozenset(hosts), token=token)


def _trust(args: argparse.Namespace) -> Any:
    """The agent's bootstrap trust set from --trust-key/--trust-threshold (None: none)."""
    from ..policy.keys import KeyFileError, load_public_key
    from ..policy.trust import TrustError, TrustSet
    if not args.trust_key:
        if args.trust_threshold != 1:
            raise UsageError("--trust-threshold needs --trust-key")
        return None
    try:
        return TrustSet.of([load_public_key(k) for k in args.trust_key], args.trust_threshold)
    except KeyFileError as e:
        raise UsageError(f"--trust-key {e}") from None
    except TrustError as e:
        raise UsageError(str(e)) from None


def _leaves(e: BaseException) -> list[BaseException]:
    """The individual exceptions inside (possibly nested) exception groups."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


if __name__ == "__main__":
    sys.exit(main())
