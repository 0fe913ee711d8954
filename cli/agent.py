"""``rumor agent``: run one gossip member with its local API in the foreground.

Exits 0 after a graceful leave (SIGINT, SIGTERM or ``rumor leave``), 1 when it could
not start (port taken, no seed answered) with one clear line on stderr.

With ``--data-dir`` it remembers its members (``gossip/rejoin.py``) and, when no
``--join`` seed answers or none is given, rejoins through them; ``--retry-join`` seeds
are tried in the background until one answers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry

from ..gossip.accept import FdBudget, FdPool
from ..gossip.address import format_address
from ..gossip.cluster_keyring import ClusterKeyring
from ..gossip.config import GossipConfig
from ..gossip.discovery import Discovery
from ..gossip.keyring import Keyring, KeyringSeal
from ..gossip.node import BindError, JoinError, Node, NodeConfig
from ..gossip.rejoin import SnapshotKeeper, join_at_start, open_snapshot, retry_join
from ..gossip.service_spec import Registration
from ..gossip.snapshot import REJOIN_BATCH
from ..gossip.trace import TraceFile
from ..gossip.version import RELEASE_TAG, release
from ..gossip.wire import PROTOCOL_VERSION, Address
from ..policy.evaluate import Evaluator
from ..policy.replication import PolicyReplicator
from ..policy.runtime import PolicyRuntime
from ..policy.trust import TrustSet
from ..proxy.access_log import AccessLog, AccessLogObserver
from ..proxy.api.access import ApiAccess
from ..proxy.api.app import make_api
from ..proxy.api.metrics import AgentCollector
from ..proxy.api.server import serve_http
from ..proxy.api.stat import register_golden_query
from ..proxy.api.tap import register_tap_query
from ..proxy.check_runner import CheckRunner
from ..proxy.golden import GoldenMetrics
from ..proxy.headers import sample_threshold
from ..proxy.inbound import InboundProxy
from ..proxy.limits import ListenerShare, SidecarLimits, plan_pools
from ..proxy.mesh_view import NodeView
from ..proxy.metrics import ProxyMetrics
from ..proxy.observe import Observer, observers
from ..proxy.outbound import INBOUND_TAG, OutboundProxy
from ..proxy.protocols import CARRIES_TAG
from ..proxy.relay import AltProtocols, ProxyLimits, serve_proxy
from ..proxy.tap import TapHub
from ..proxy.tcp_spec import Upstream
from ..proxy.tls import MeshTls, TlsConfigError, TlsFiles
from .logs import log_event
from .node_identity import IdentityError, build_identity
from .reload import Reloader
from .systemd import Notifier

if TYPE_CHECKING:
    from ..proxy.spans import SpanRecorder

log = logging.getLogger("rumor.agent")
#: What applies when the agent trusts no publisher: no documents, so defaults.
NO_POLICY = Evaluator([])


@dataclass
class AgentOptions:
    name: str
    bind: Address
    api: Address
    gossip: GossipConfig
    profile: str
    advertise: Address | None = None
    join: list[str] = field(default_factory=list)
    #: Seeds tried in the background until one answers (--retry-join), the longest
    #: wait between rounds, and whether a snapshot is rejoined through after a leave.
    retry_join: list[Address] = field(default_factory=list)
    retry_interval: float = 30.0
    rejoin_after_leave: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    services: list[Registration] = field(default_factory=list)
    #: Where to answer DNS (UDP and TCP); None: no DNS server.
    dns: Address | None = None
    #: TTLs of DNS answers: a service's records, a node's (and an address's) records.
    dns_service_ttl: int = 0
    dns_node_ttl: int = 0
    #: Trusted policy publishers; None: accept no policy documents.
    trust: TrustSet | None = None
    #: What survives a restart: the member snapshot and the policy documents.
    data_dir: str | None = None
    #: The sidecar's listeners (None: not started) and who its outbound calls as.
    outbound: Address | None = None
    inbound: Address | None = None
    identity: str | None = None
    #: Local ports carried to TCP services (--upstream; proxy/tcp_proxy.py).
    upstreams: list[Upstream] = field(default_factory=list)
    tcp_idle_timeout: float = 3600.0
    access_log: str | None = None
    balancer_decay: float = 10.0
    #: The OTLP/HTTP traces endpoint spans are exported to (None: no spans recorded).
    otlp: str | None = None
    #: Share of new traces sampled (the ``traceparent`` flag; spans only when sampled).
    trace_sample: float = 1.0
    #: The sidecar listeners' connection pools and first-byte timeout (proxy/limits.py).
    proxy_limits: SidecarLimits = field(default_factory=SidecarLimits)
    #: Gossip encryption keys (from --keyring, kept up to date in that file).
    keyring: Keyring | None = None
    keyring_file: str | None = None
    #: Mutual TLS on the sidecar hop (--tls-ca/--tls-cert/--tls-key).
    tls: TlsFiles | None = None
    #: Who may drive the local API (--api-token-file, --api-allow-host).
    api_access: ApiAccess = field(default_factory=ApiAccess)
    api_token_file: str | None = None
    #: Whose word counts about a member (``cli/node_identity.py``): the mode, trust
    #: on first use, the CA that signs node credentials and, for credentials signed
    #: by the policy trust keys alone, the cluster they name.
    node_identity: str = "auto"
    node_tofu: bool = False
    node_ca: str | None = None
    node_cluster: str | None = None
    #: Diagnostics: where to write the dissemination trace (gossip/trace.py).
    trace_gossip: str | None = None
    #: The command line and files these options came from (a reload reads them
    #: again; None: built in code, nothing to re-read) and every key's value as a
    #: file would spell it (``rumor config show``; ``cli/config.py``).
    argv: list[str] | None = None
    config_files: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


class StartupError(Exception):
    """The agent could not start; the message is meant for the operator."""


async def run_agent(opts: AgentOptions, notifier: Notifier | None = None) -> None:
    """Run until a graceful leave. ``notifier`` tells systemd (default: as
    ``$NOTIFY_SOCKET`` says): ``READY=1`` once joined, or without seeds once every
    listener is up; ``STOPPING=1`` when the leave starts; ``WATCHDOG=1`` meanwhile."""
    notify = notifier or Notifier.from_environ(os.environ, os.getpid())
    # Sealed packets carry calendar time (the replay window); the core runs on trio's.
    seal = KeyringSeal(opts.keyring, wall_offset=time.time() - trio.current_time(),
                       random_bytes=os.urandom) if opts.keyring is not None else None
    for warning in exposure_warnings(opts):
        log.warning("%s", warning, extra={"event": "exposed"})
    fds = FdBudget.from_process()
    log.debug("descriptor budget: %s", fds.describe(), extra={"event": "fds"})
    snapshots, prior = None, None
    if opts.data_dir is not None:
        try:
            snapshots, prior = open_snapshot(Path(opts.data_dir), opts.name)
        except OSError as e:
            raise StartupError(f"cannot use --data-dir {opts.data_dir}: "
                               f"{e.strerror or e}") from None
    try:
        identity = build_identity(opts)
    except IdentityError as e:
        raise StartupError(str(e)) from None
    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    cfg = NodeConfig(name=opts.name, bind=opts.bind, advertise=opts.advertise,
                     gossip=opts.gossip, profile=opts.profile,
                     tags={**opts.tags, RELEASE_TAG: release()}, seal=seal,
                     fds=fds.gossip, identity=identity,
                     extras=[PolicyReplicator.factory(opts.trust)] if opts.trust else [])
    stop = trio.Event()
    trace = TraceFile(opts.trace_gossip, opts.name) if opts.trace_gossip else None
    try:
        async with Node(cfg) as node, trio.open_nursery() as nursery:
            node.core.trace = trace
            if prior is not None:
                node.core.remember_bindings({m.name: m.credential for m in prior.members
                                             if m.credential is not None})
            # First, so that a slow start (a far seed) is not mistaken for a hang.
            nursery.start_soon(notify.run_watchdog)
            nursery.start_soon(_log_events, node)
            discovery = Discovery(node.parts.catalog, node.wake, probes=CheckRunner)
            nursery.start_soon(discovery.run)
            keyring = None
            commands = node.parts.keyring  # assembled when gossip is sealed
            if commands is not None:
                keyring = ClusterKeyring(commands, node.queries, Path(opts.keyring_file)
                                         if opts.keyring_file else None)
                keys = len(commands.seal.keyring.keys)
                log.info("gossip encrypted: %d key(s) installed", keys,
                         extra={"event": "keyring", "keys": keys})
            policies = _start_policies(node, opts)
            if policies is not None:
                nursery.start_soon(policies.run)
            registry = CollectorRegistry()
            registry.register(AgentCollector(node.health,
                                             policies.status if policies else None))
            from .main import reread
            reloader = Reloader(opts, node, discovery, policies, reread=reread)
            reloader.own_tags[RELEASE_TAG] = release()
            nursery.start_soon(reloader.run_signals)
            golden = _golden(node, policies)
            register_golden_query(node.queries, golden)
            tap = TapHub(time.time, trio.current_time())
            register_tap_query(node.queries, tap)
            try:
                api = make_api(node, on_leave=stop.set, on_leaving=notify.stopping,
                               catalog=discovery,
                               policies=policies, metrics=registry, keyring=keyring,
                               access=opts.api_access, control=reloader,
                               queries=node.queries, golden=golden, name=opts.name)
                await nursery.start(partial(serve_http, api, opts.api[0], opts.api[1],
                                            pool=fds.api))
            except OSError as e:
                raise StartupError(f"cannot bind API address {format_address(opts.api)}: "
                                   f"{e.strerror or e}") from None
            if opts.dns is not None:
                await _start_dns(nursery, node, discovery, opts.dns, opts, fds.dns)
            if opts.outbound is not None or opts.inbound is not None or opts.upstreams:
                await _start_sidecar(nursery, node, opts, policies, registry, fds.proxy,
                                     reloader, observers(golden, tap))
            if opts.services:
                # One batch: the records travel together (by stream when large).
                discovery.register_many(opts.services)
                log.info("registered %d service(s): %s", len(opts.services),
                         ", ".join(r.service.id for r in opts.services),
                         extra={"event": "services",
                                "services": [r.service.id for r in opts.services]})
            log.info("agent %s (rumor %s, gossip protocol %d) gossiping on %s, API on "
                     "http://%s (profile %s)", opts.name, release(), PROTOCOL_VERSION,
                     format_address(node.address), format_address(opts.api), opts.profile,
                     extra={"event": "start", "node": opts.name,
                            "gossip": format_address(node.address),
                            "api": format_address(opts.api),
                            "version": release(), "protocol": PROTOCOL_VERSION})
            keeper = None
            if snapshots is not None:
                keeper = SnapshotKeeper(node, snapshots, written=prior)
                nursery.start_soon(keeper.run)  # before the join: it records its members
            try:
                contacted, remembered = await join_at_start(
                    node, opts.join, prior, rng, rejoin_after_leave=opts.rejoin_after_leave)
            except JoinError as e:
                raise StartupError(str(e)) from None
            if opts.retry_join:
                nursery.start_soon(partial(_retry_join, node, opts.retry_join, opts,
                                           notify, rng))
            if remembered:
                nursery.start_soon(partial(_retry_join, node, remembered, opts, notify,
                                           rng, REJOIN_BATCH))
            nursery.start_soon(_wait_for_signal, stop)
            notify.ready(ready_status(opts, node, contacted))
            await stop.wait()
            if not node.core.leaving:  # `rumor leave` has already left through the API
                log.info("leaving the cluster", extra={"event": "leaving"})
                notify.stopping()
                await node.leave()
            if keeper is not None:
                await keeper.close(left=True)  # the next start does not rejoin by itself
            nursery.cancel_scope.cancel()
    except BindError as e:
        raise StartupError(str(e)) from None
    finally:
        if trace is not None:
            trace.close()
    log.info("agent stopped", extra={"event": "stop"})


def ready_status(opts: AgentOptions, node: Node, contacted: int | None) -> str:
    """The STATUS line sent with READY=1 (``systemctl status`` shows it)."""
    alive = sum(1 for m in node.core.members.values() if m.live)
    if contacted is not None:
        how = f"joined through {contacted} member(s)"
    elif opts.retry_join:
        how = f"listening, retrying {len(opts.retry_join)} seed(s) in the background"
    else:
        how = "listening, no seeds to join"
    return (f"{how}; {alive} member(s) alive; gossip on {format_address(node.address)}, "
            f"API on {format_address(opts.api)}")


async def _retry_join(node: Node, seeds: list[str] | list[Address], opts: AgentOptions,
                      notify: Notifier, rng: random.Random,
                      per_round: int | None = None) -> None:
    """``retry_join`` until one answers, then say so to the service manager too."""
    n = await retry_join(node, seeds, opts.retry_interval, rng, per_round=per_round)
    notify.status(ready_status(opts, node, n))


def exposure_warnings(opts: AgentOptions) -> list[str]:
    """What an operator must hear at start: secrets or controls open to others."""
    out = []
    if opts.keyring is None and not is_loopback(opts.bind[0]):
        out.append(f"gossip on {format_address(opts.bind)} is not encrypted: anyone who "
                   "can reach it can join, forge members and read every message (give "
                   "--keyring)")
    if opts.api_access.token is None and not is_loopback(opts.api[0]):
        out.append(f"the API on {format_address(opts.api)} is reachable from other hosts "
                   "and accepts changes without a token (give --api-token-file)")
    for what, path in (("keyring", opts.keyring_file), ("API token", opts.api_token_file)):
        mode = _mode(path)
        if mode is not None and mode & 0o077:
            out.append(f"the {what} file {path} is readable by other users (mode "
                       f"{mode:04o}): chmod 600 it, it holds a secret")
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mode(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def _start_policies(node: Node, opts: AgentOptions) -> PolicyRuntime | None:
    if opts.trust is None:
        log.info("no --trust-key: this agent accepts no policy documents",
                 extra={"event": "policy_disabled"})
        return None
    try:
        policies = PolicyRuntime(node.parts.extras["policy"], node.wake,
                                 data_dir=opts.data_dir)
    except OSError as e:
        raise StartupError(f"cannot use --data-dir {opts.data_dir}: {e.strerror or e}") from None
    policies.start()
    log.info("policy: %d trusted key(s), threshold %d, %d document(s) held",
             len(opts.trust.keys), opts.trust.threshold, len(policies.store.held),
             extra={"event": "policy", "keys": opts.trust.ids(),
                    "threshold": opts.trust.threshold})
    return policies


def _known(node: Node, policies: PolicyRuntime | None) -> Callable[[str], bool]:
    """Whether a service name counts in the data plane's metrics: the catalog or a
    policy names it (a request head is the network's to choose)."""
    catalog = node.parts.catalog
    return lambda name: catalog.knows(name) or (policies is not None
                                                and policies.evaluator.names(name))


def _golden(node: Node, policies: PolicyRuntime | None) -> GoldenMetrics:
    """The golden metrics (``proxy/golden.py``), bounded by the same names as ``/metrics``."""
    return GoldenMetrics(time.time, trio.current_time(), known=_known(node, policies))


async def _start_sidecar(nursery: trio.Nursery, node: Node, opts: AgentOptions,
                         policies: PolicyRuntime | None, registry: CollectorRegistry,
                         fds: FdPool, reloader: Reloader, watchers: Observer) -> None:
    """Start the data plane's listeners; the inbound one is advertised in our tags so
    other sidecars know where to send this host's services' traffic. What a reload may
    change (the access log, the TLS files, the tags) is handed to ``reloader``."""
    def evaluator() -> Evaluator:
        return policies.evaluator if policies is not None else NO_POLICY

    metrics = ProxyMetrics(registry, known=_known(node, policies))
    access_log = AccessLog(opts.access_log) if opts.access_log else None
    if access_log is not None:
        nursery.start_soon(access_log.run)  # writes in batches; the rest at shutdown
    tls = _mesh_tls(opts)
    identity = _identity(opts, tls) if opts.outbound is not None or opts.upstreams else None
    # Here, not at the top: an agent without a sidecar never imports h2 (~90 ms).
    from ..proxy.h2_client import H2Upstreams
    from ..proxy.h2_inbound import H2Inbound
    from ..proxy.h2_outbound import H2Outbound, h2_listener
    from ..proxy.tcp_inbound import TcpInbound
    from ..proxy.tcp_metrics import TcpMetrics
    from ..proxy.tcp_proxy import TcpUpstreams
    tcp_metrics = TcpMetrics(registry, known=_known(node, policies))
    threshold = sample_threshold(opts.trace_sample)
    spans = await _start_spans(nursery, opts, identity, threshold, registry)
    # Everything that watches a request sits behind one observer (proxy/observe.py).
    observer = observers(metrics, watchers,
                         AccessLogObserver(access_log) if access_log else None, spans)
    mesh = NodeView(node)
    reloader.access_log, reloader.tls = access_log, tls
    # Inbound (the network) and outbound (this host's applications) get pools of their
    # own, each with a per-client cap below it, so neither can starve the other.
    # Upstream ports are this host's calls out too: they share the outbound pool. (One
    # added by a reload to an agent that had neither gets a pool beside the inbound's.)
    calls_out = opts.outbound is not None or bool(opts.upstreams)
    plan = plan_pools(fds.size, opts.proxy_limits, inbound=opts.inbound is not None,
                      outbound=calls_out)
    outbound_fds = FdPool("outbound", plan.outbound.fds)
    for note in plan.notes:
        log.warning("%s", note, extra={"event": "proxy_limits"})
    log.info("sidecar connections: %s", plan.describe(), extra={"event": "proxy_limits"})
    limits = ProxyLimits(first_byte_timeout=opts.proxy_limits.first_byte_timeout)
    if tls is not None:
        nursery.start_soon(tls.run_reloader)
        registry.register(AgentCollector(tls=lambda: tls.stats))
        if tls.identity.node is not None and tls.identity.node != opts.name:
            log.warning("the TLS certificate was issued for node %s, this agent is %s",
                        tls.identity.node, opts.name, extra={"event": "tls_node_mismatch"})
        log.info("mutual TLS on the sidecar hop: %s, certificate valid until %s",
                 tls.describe(), tls.not_after.isoformat(),
                 extra={"event": "tls", "services": sorted(tls.identity.services)})
    if opts.inbound is not None:
        inbound = InboundProxy(mesh, evaluator, observer=observer, tls=tls, agent=opts.name,
                               trace_threshold=threshold)
        # Besides HTTP/1.1: what other sidecars may open here (proxy/protocols.py).
        tcp_inbound = TcpInbound(mesh, evaluator, watchdog=inbound.watchdog, tls=tls,
                                 metrics=tcp_metrics, idle=opts.tcp_idle_timeout)
        reloader.tcp_inbound = tcp_inbound
        inbound_alt = AltProtocols(h2=h2_listener(H2Inbound(inbound, H2Upstreams(
            inbound.watchdog))), tcp=tcp_inbound)
        port = await _listen(nursery, inbound, opts.inbound, "inbound", metrics,
                             plan.inbound, limits, tls, inbound_alt)
        host = opts.inbound[0]
        if host in ("0.0.0.0", "::"):
            host = node.address[0]
        # "[v6]:port": a bare IPv6 host with ":port" after it cannot be parsed back.
        reloader.own_tags[INBOUND_TAG] = format_address((host, port))
        # Callers send HTTP/2 or mesh TCP only to an inbound that says it takes them.
        carried = [p for p, h in (("h2", inbound_alt.h2), ("tcp", inbound_alt.tcp)) if h]
        if carried:
            reloader.own_tags[CARRIES_TAG] = ",".join(carried)
        node.set_tags({**opts.tags, **reloader.own_tags})
        log.info("inbound listener on %s:%d", opts.inbound[0], port,
                 extra={"event": "inbound", "inbound": f"{host}:{port}"})
    if opts.outbound is not None:
        outbound = OutboundProxy(mesh, evaluator, identity=identity, observer=observer,
                                 decay=opts.balancer_decay, tls=tls, agent=opts.name,
                                 trace_threshold=threshold)
        # h2c from the applications (gRPC clients): each stream balanced on its own
        outbound_alt = AltProtocols(h2=h2_listener(H2Outbound(outbound, H2Upstreams(
            outbound.watchdog, tls=tls))))
        port = await _listen(nursery, outbound, opts.outbound, "outbound", metrics,
                             plan.outbound, limits, alt=outbound_alt, pool=outbound_fds)
        log.info("outbound listener on %s:%d (calling as %s)", opts.outbound[0], port,
                 identity or "an unknown service",
                 extra={"event": "outbound", "outbound": f"{opts.outbound[0]}:{port}",
                        "identity": identity})
    # Upstream ports (TCP services): started even with none, so a reload can add one.
    upstreams = TcpUpstreams(mesh, evaluator, identity=identity, tls=tls, metrics=tcp_metrics,
                             decay=opts.balancer_decay, idle=opts.tcp_idle_timeout,
                             pool=outbound_fds, max_per_client=plan.outbound.per_client)
    try:
        upstreams.apply(opts.upstreams, upstreams.prepare(opts.upstreams))
    except OSError as e:
        raise StartupError(str(e.strerror)) from None
    await nursery.start(upstreams.run)
    reloader.upstreams = upstreams


def _identity(opts: AgentOptions, tls: MeshTls | None) -> str | None:
    """Whom the outbound listener calls as: ``--identity``, the one local service, or
    the one service the certificate names."""
    identity = opts.identity or _default_identity(opts)
    if tls is not None:
        names = tls.identity.services
        if identity is None and len(names) == 1:
            identity = next(iter(names))
        if identity is not None and identity not in names:
            raise StartupError(f"--identity {identity}: this agent's certificate names "
                               f"only {', '.join(sorted(names))}; callees would refuse it")
    return identity


async def _start_spans(nursery: trio.Nursery, opts: AgentOptions, identity: str | None,
                       threshold: int, registry: CollectorRegistry) -> SpanRecorder | None:
    """With ``--otlp``: the span recorder on the request path and its exporter task
    (``proxy/spans.py``, ``proxy/otlp.py``); its counters go to ``/metrics``."""
    if opts.otlp is None:
        return None
    from ..proxy.otlp import OtlpExporter, settings_from
    from ..proxy.spans import SpanEncoder, SpanRecorder
    try:
        settings = settings_from(os.environ)
    except ValueError as e:
        raise StartupError(f"span export: {e}") from None
    recorder = SpanRecorder(random.Random(), threshold=threshold, capacity=settings.queue,
                            batch=settings.batch)
    exporter = OtlpExporter(recorder, SpanEncoder(opts.name, release(), identity), opts.otlp,
                            interval=settings.interval, timeout=settings.timeout)
    await nursery.start(exporter.run)
    registry.register(AgentCollector(spans=lambda: recorder.stats))
    log.info("exporting spans to %s (%.3g of new traces sampled)", opts.otlp,
             opts.trace_sample, extra={"event": "otlp", "url": opts.otlp})
    return recorder


def _default_identity(opts: AgentOptions) -> str | None:
    names = {r.service.name for r in opts.services}
    return names.pop() if len(names) == 1 else None


def _mesh_tls(opts: AgentOptions) -> MeshTls | None:
    if opts.tls is None:
        return None
    try:
        return MeshTls(opts.tls)
    except TlsConfigError as e:
        raise StartupError(f"TLS: {e}") from None


async def _listen(nursery: trio.Nursery, handler: InboundProxy | OutboundProxy, addr: Address,
                  what: str,
                  metrics: ProxyMetrics, share: ListenerShare, limits: ProxyLimits,
                  tls: MeshTls | None = None, alt: AltProtocols | None = None,
                  pool: FdPool | None = None) -> int:
    def refused(client: str, status: int, reason: str) -> None:
        metrics.protocol_errors.inc((what, status))

    try:
        port: int = await nursery.start(partial(serve_proxy, handler, addr[0], addr[1],
                                                watchdog=handler.watchdog,
                                                on_error=refused, tls=tls, limits=limits,
                                                pool=pool or FdPool(what, share.fds),
                                                max_per_client=share.per_client,
                                                alt=alt if alt is not None and (
                                                    alt.h2 or alt.tcp) else None))
    except OSError as e:
        raise StartupError(f"cannot bind {what} address {format_address(addr)}: "
                           f"{e.strerror or e}") from None
    return port


async def _start_dns(nursery: trio.Nursery, node: Node, discovery: Discovery,
                     addr: Address, opts: AgentOptions, pool: FdPool) -> None:
    # Here, not at the top: only an agent given --dns imports dnslib.
    from ..proxy.api.dns import CatalogSource, DnsResponder
    from ..proxy.api.dns_server import serve_dns

    def member_address(name: str) -> str | None:
        # DNS names arrive lower-cased; member names keep their case.
        m = node.core.members.get(name) or next(
            (m for m in node.core.members.values() if m.name.lower() == name), None)
        return m.addr[0] if m is not None and m.live else None

    responder = DnsResponder(CatalogSource(discovery, member_address),
                             service_ttl=opts.dns_service_ttl, node_ttl=opts.dns_node_ttl)
    try:
        port = await nursery.start(partial(serve_dns, responder, addr[0], addr[1], pool=pool))
    except OSError as e:
        raise StartupError(f"cannot bind DNS address {format_address(addr)} (UDP and TCP): "
                           f"{e.strerror or e}") from None
    bound = format_address((addr[0], port))
    log.info("DNS on udp+tcp://%s for *.service.rumor", bound,
             extra={"event": "dns", "dns": bound})


async def _wait_for_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _log_events(node: Node) -> None:
    events = node.subscribe()
    async for ev in events:
        log_event(log, ev.to_json())
