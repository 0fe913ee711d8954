"""Live reload: SIGHUP or ``rumor reload`` make the agent re-read its configuration.

The new options are built exactly as at start (``cli/main.py``: the same command line,
the files read again, flags over files), so a file that does not parse, or names a
key file that does not load, changes nothing and says why. Then each setting is
compared with the running one (:func:`plan`): services and their checks, tags, trust
keys and threshold, the log level, the access-log file and the TLS files are applied
without leaving the cluster or dropping a request; anything else that changed (the
bind address, the name, ...) is reported as needing a restart, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..proxy.api.control import ReloadRefused

if TYPE_CHECKING:
    from ..gossip.discovery import Discovery
    from ..gossip.node import Node
    from ..policy.runtime import PolicyRuntime
    from ..proxy.access_log import AccessLog
    from ..proxy.tcp_inbound import TcpInbound
    from ..proxy.tcp_proxy import TcpUpstreams
    from ..proxy.tls import MeshTls
    from .agent import AgentOptions

log = logging.getLogger("rumor.agent")

#: Settings (file keys) a running agent applies; the rest need a restart.
LIVE = frozenset({"service", "tag", "trust_key", "trust_threshold", "log_level",
                  "access_log", "tls_ca", "tls_cert", "tls_key", "upstream",
                  "tcp_idle_timeout"})


class ReloadError(ReloadRefused):
    """The new configuration was refused; nothing was changed (the API's 400)."""


@dataclass(frozen=True)
class Plan:
    """What a reload changes: live settings to apply, others that need a restart."""

    apply: tuple[str, ...]
    restart: tuple[str, ...]


def plan(old: Mapping[str, Any], new: Mapping[str, Any]) -> Plan:
    """Compare two ``AgentOptions.settings`` key by key."""
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return Plan(tuple(k for k in changed if k in LIVE),
                tuple(k for k in changed if k not in LIVE))


@dataclass
class Reloader:
    """The running agent's handles a reload acts on (owned by ``run_agent``)."""

    opts: AgentOptions
    node: Node
    discovery: Discovery
    policies: PolicyRuntime | None = None
    access_log: AccessLog | None = None
    tls: MeshTls | None = None
    #: The upstream ports (TCP services); None when the agent runs no sidecar.
    upstreams: TcpUpstreams | None = None
    #: The inbound listener's mesh-TCP part; None without an inbound listener.
    tcp_inbound: TcpInbound | None = None
    #: Upstream listeners bound by ``_check``, served by ``_apply``.
    _bound: list[Any] = field(default_factory=list)
    #: Re-reads the configuration (``cli.main.reread``): new options or ReloadError.
    reread: Callable[[list[str]], AgentOptions] | None = None
    #: Tags the agent adds itself (its inbound listener), kept across tag changes.
    own_tags: dict[str, str] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def config(self) -> dict[str, Any]:
        """The effective configuration (``GET /v1/agent/config``)."""
        return {"files": list(self.opts.config_files), "settings": self.opts.settings}

    async def reload(self) -> dict[str, Any]:
        """Apply what changed; ``{"applied": [...], "restart": [...]}``. Raises
        ``ReloadError`` (nothing changed) when the configuration is refused."""
        async with self._lock:
            if self.opts.argv is None or self.reread is None:
                raise ReloadError("this agent was not started from a command line: "
                                  "there is no configuration to read again")
            new = self.reread(self.opts.argv)
            p = plan(self.opts.settings, new.settings)
            switched = self._switches(p, new)
            p = Plan(tuple(k for k in p.apply if k not in switched),
                     tuple(sorted(set(p.restart) | switched)))
            self._check(p, new)
            for group in sorted({_group(k) for k in p.apply}):
                self._apply(group, new)
            # Settings that need a restart keep running as they are: remember the
            # running values, so the next reload reports them again.
            running = dict(new.settings)
            for key in p.restart:
                if key in self.opts.settings:
                    running[key] = self.opts.settings[key]
                else:
                    running.pop(key, None)
            self.opts = dataclasses.replace(new, settings=running)
            applied = {_group(k) for k in p.apply}
            # Same paths, new contents (a renewed certificate): check now, not at the
            # reloader's next look.
            if self.tls is not None and "tls" not in applied and \
                    self.tls.reload_if_changed():
                applied.add("tls")
            for key in sorted(applied):
                log.info("reload: %s applied", key, extra={"event": "reload_applied",
                                                           "key": key})
            for key in p.restart:
                log.warning("reload: %s changed but needs a restart; still running with "
                            "the old value", key, extra={"event": "reload_restart",
                                                         "key": key})
            return {"applied": sorted(applied), "restart": list(p.restart)}

    async def run_signals(self) -> None:
        """Reload on every SIGHUP until cancelled (a task of the agent's nursery)."""
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                log.info("SIGHUP: reloading the configuration", extra={"event": "reload"})
                try:
                    await self.reload()
                except ReloadError as e:
                    log.error("reload refused, nothing changed: %s", e,
                              extra={"event": "reload_refused"})

    # ---- checks first, so that a refused reload changes nothing -----------------------

    def _switches(self, p: Plan, new: AgentOptions) -> set[str]:
        """Changed live settings that would switch a part on or off (policy, the
        access log, mutual TLS): those need a restart, and are reported so."""
        keys, out = set(p.apply), set()
        trust = keys & {"trust_key", "trust_threshold"}
        if trust and (self.policies is None) != (new.trust is None):
            out |= trust
        if "access_log" in keys and (self.access_log is None) != (new.access_log is None):
            out.add("access_log")
        tls = {k for k in keys if k.startswith("tls_")}
        if tls and (self.tls is None) != (new.tls is None):
            out |= tls
        if "upstream" in keys and self.upstreams is None:
            out.add("upstream")  # no sidecar part to carry them: a restart starts it
        return out

    def _check(self, p: Plan, new: AgentOptions) -> None:
        """Refuse the whole reload if a live change cannot be made as asked."""
        keys = set(p.apply)
        if "service" in keys:
            from ..gossip.catalog import CatalogLimitError
            old = {r.service.id for r in self.opts.services}
            now = {r.service.id for r in new.services}
            try:
                self.discovery.check_registrations(list(new.services), old - now)
            except CatalogLimitError as e:
                raise ReloadError(f"service: {e}") from None
        if any(k.startswith("tls_") for k in keys) and self.tls and new.tls:
            from ..proxy.tls import TlsConfigError
            try:
                self.tls.check_files(new.tls)
            except TlsConfigError as e:
                raise ReloadError(f"TLS: {e}") from None
        if "access_log" in keys and new.access_log not in (None, "-"):
            try:
                with open(new.access_log, "a", encoding="utf-8"):
                    pass
            except OSError as e:
                raise ReloadError(f"access_log {new.access_log}: "
                                  f"{e.strerror or e}") from None
        if "upstream" in keys and self.upstreams is not None:
            # Last: a bound port is the one check that takes something (closed if the
            # reload is refused after all; nothing after this refuses).
            try:
                self._bound = self.upstreams.prepare(new.upstreams)
            except OSError as e:
                raise ReloadError(f"upstream: {e.strerror or e}") from None

    def _apply(self, group: str, new: AgentOptions) -> None:
        """One changed setting, or one group of them (``_group``); _switches has held
        back what would switch a part on or off, so what exists stays."""
        if group == "service":
            self._apply_services(new)
        elif group == "tag":
            self.node.set_tags({**new.tags, **self.own_tags})
        elif group == "trust" and self.policies and new.trust:
            self.policies.set_trust(new.trust)
        elif group == "log_level":
            logging.getLogger().setLevel(new.settings["log_level"].upper())
        elif group == "access_log" and self.access_log and new.access_log:
            self.access_log.reopen(new.access_log)
        elif group == "tls" and self.tls and new.tls:
            self.tls.use_files(new.tls)
        elif group == "upstream" and self.upstreams is not None:
            bound, self._bound = self._bound, []
            self.upstreams.apply(new.upstreams, bound)
        elif group == "tcp_idle_timeout":
            # For connections from now on; a relayed one keeps the limit it began with.
            for part in (self.upstreams, self.tcp_inbound):
                if part is not None:
                    part.idle = new.tcp_idle_timeout

    def _apply_services(self, new: AgentOptions) -> None:
        """Services from the files and flags: the removed ones go, new and changed ones
        are registered; unchanged ones keep their checks' state, and services added
        through the API are not the configuration's to remove."""
        old = {r.service.id: r for r in self.opts.services}
        now = {r.service.id: r for r in new.services}
        for sid in sorted(old.keys() - now.keys()):
            self.discovery.deregister(sid)
        changed = [r for sid, r in now.items() if old.get(sid) != r]
        if changed:
            self.discovery.register_many(changed)


def _group(key: str) -> str:
    """Report the TLS files and the trust settings as one change each."""
    if key.startswith("tls_"):
        return "tls"
    if key.startswith("trust_"):
        return "trust"
    return key
