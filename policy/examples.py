'''One commented, valid document of each kind, for ``rumor policy example KIND``.

Operators start from these rather than from the reference, so every field is present
(optional ones at least as a commented-out line) with its meaning, range and default
next to it. The tests parse each one and check that no field of the schema is missing
from it, so the examples cannot drift from ``documents.py``.
'''

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

ROUTE = """\
# A route document: how the requests for one service are shared among its instances.

kind = "route"            # route | resilience | access | fault | ratelimit | trust
name = "web-canary"       # the document's identity in the mesh: [a-z0-9][a-z0-9._-]{0,62}
version = 1               # integer >= 1; publish every change with a higher version
                          # (agents keep the highest version of a name and refuse older ones)
description = "10% of web traffic to v2; testers always to v2"   # optional, free text
# expires = 2030-01-01T00:00:00Z
                          # optional: an offset date-time, without quotes ("Z" or "+02:00"
                          # required). When it passes, agents drop the document and the
                          # service is routed to all its instances again.

service = "web"           # the destination service, as instances register it in the catalog

# Subsets: named groups of the service's instances. An instance belongs to a subset when its
# version equals `version` (when given) and it carries every tag in `tags` (when given); a
# subset needs at least one of the two. The subset "all" is built in: every instance.
[[subset]]
name = "stable"           # [a-z0-9][a-z0-9._-]{0,62}, unique in the document, not "all"
version = "v1"            # the instance's registered version (--service ...,version=v1)

[[subset]]
name = "canary"
version = "v2"
tags = ["canary"]         # the instance must carry all of these tags (default: none)

# The default split, for requests that no rule below matches. Each request goes to one
# subset, with the probability weight / sum of weights (here 90 and 10 out of 100).
# Weights are integers from 0 to 1000000, not all 0; a subset appears at most once.
# Without any [[split]], requests go to all instances.
[[split]]
subset = "stable"         # a subset defined above, or "all"
weight = 90

[[split]]
subset = "canary"
weight = 10

# Rules, tried in order: the first rule whose conditions all hold decides, and a request
# no rule matches takes the split above. A rule has at least one condition of path,
# method, query and headers; all the ones it has must hold (as in the Gateway API's
# HTTPRouteMatch). No regular expressions.
# Headers: names are case-insensitive, values compared case-sensitively; each condition
# has `name` and exactly one of `exact` (the value equals), `prefix` (the value starts
# with) or `present`.
[[rule]]
name = "testers"          # optional (default "rule[0]", "rule[1]", ...); shown in decisions
headers = [
  { name = "X-Canary", exact = "1" },
]
subset = "canary"         # every matching request goes to this one subset, ...

[[rule]]
name = "api-reads"
path = { prefix = "/api" }   # the path without the query, as sent (starts with "/"). A
                             # prefix matches whole segments: "/api", "/api/", "/api/x",
                             # not "/apix". Or exact = "/api/health": that path only.
method = ["GET", "HEAD"]     # one method ("GET") or a list: any of them (upper-cased;
                             # compared as sent, methods are case-sensitive)
query = [                    # query parameters (first value of a name, percent-decoded)
  { name = "debug", exact = "1" },     # the parameter equals ...
  { name = "trace", present = true },  # ... or is there (false: is not there)
]
subset = "canary"

[rule.request_headers]       # edits of the request headers before it is forwarded (this
                             # rule's requests only); lower-case names, each in one list
set = { "x-env" = "canary" }          # replace every value of the header with this one
add = { "x-route" = "api-reads" }     # add a value, keeping those already there
remove = ["x-debug-token"]            # drop the header
# Mesh headers (x-rumor-*), hop-by-hop headers, host and content-length cannot be edited;
# values are ASCII, at most 1024 characters, without control characters.

[[rule]]
name = "beta-users"
headers = [
  { name = "x-user-group", prefix = "beta-" },
  { name = "x-debug", present = false },   # true: the header is there (any value);
                                           # false: the header is not there
]
split = [                 # ... or a weighted split of their own (same form as [[split]])
  { subset = "canary", weight = 50 },
  { subset = "stable", weight = 50 },
]
"""

RESILIENCE = """\
# A resilience document: timeouts, retries, circuit breaking and outlier ejection applied
# by every agent's proxy to the requests it sends to one service. Every table and field
# is optional; an omitted one takes the default shown. Durations are strings: "250ms",
# "5s", "1.5m", "1h".

kind = "resilience"       # route | resilience | access | fault | ratelimit | trust
name = "web-resilience"   # the document's identity in the mesh: [a-z0-9][a-z0-9._-]{0,62}
version = 1               # integer >= 1; publish every change with a higher version
description = "web answers within 10s; retry gateway errors"   # optional, free text
# expires = 2030-01-01T00:00:00Z   # optional, an offset date-time; after it: the defaults

service = "web"           # the destination service

balancer = "peak_ewma"    # how each caller's sidecar picks an instance (default peak_ewma):
                          #   peak_ewma      power of two choices over latency x outstanding
                          #   least_request  power of two choices over outstanding requests
                          #   round_robin    each instance in turn, by weight
                          #   random         a weighted random instance
                          #   hash           consistent hashing of a header or cookie:
                          #                  needs [hash] below
# [hash]                  # only with balancer = "hash", and then required: exactly one of
# header = "x-user"       #   a request header's value, or
# cookie = "session"      #   a cookie's value; a request without it is balanced as random

[slow_start]              # a new or readmitted instance gets a growing share of requests
window = "10s"            # from min_percent to full over this long (default 10s; "0s"
                          # turns slow start off; at most 10m)
aggression = 1.0          # the ramp's curve, (age / window) ^ (1 / aggression): 1 is
                          # linear, more is a faster start (more than 0, at most 10;
                          # default 1.0)
min_percent = 10.0        # the share a new instance starts at, percent of its full share
                          # (more than 0, at most 100; default 10)

[timeouts]
connect = "1s"            # to open a connection to an instance (default 2s, or per_try
                          # when shorter); at most per_try
per_try = "3s"            # one try, from sending it to its response headers (default:
                          # overall); at most overall
overall = "10s"           # the whole request, every try and backoff included, until the
                          # response headers (default 15s, at most 1h). Bodies then stream
                          # with no deadline from this document.

[retries]
attempts = 3              # tries in all, the first included: 1-10, and 1 turns retries
                          # off (default 3)
on = ["connect-failure", "502", "503", "504"]
                          # the failures retried (default connect-failure, 502, 503).
                          # "504" includes a try that ran out of per_try.
non_idempotent = false    # false: only GET, HEAD, OPTIONS, TRACE, PUT and DELETE are
                          # retried on 502/503/504; true: POST and PATCH too. A connect
                          # failure is retried for every method: the request never left.
grpc_on = ["unavailable"] # gRPC statuses retried when a call's answer is trailers-only
                          # (default unavailable; names from the gRPC spec, lower case)
backoff = "25ms"          # the wait before retry n is random, up to backoff × 2^(n-1)
max_backoff = "250ms"     # ... capped here (defaults 25ms and 250ms; backoff <= 10s,
                          # max_backoff from backoff to 1m)

[retries.budget]          # retries are taken only within this budget, so that retrying
                          # cannot multiply the load on a service that is already failing
ratio = 0.2               # retries may add this share of the requests (0-1, default 0.2) ...
min_per_second = 10       # ... plus this many per second, so that a service with little
                          # traffic can still retry (0-100000, default 10)
window = "10s"            # the period over which requests and retries are counted
                          # (1s-1m, default 10s)

[circuit_breaker]         # limits per agent (each agent counts its own requests)
max_requests = 1024       # requests in flight to the service at once (1-1000000,
                          # default 1024); more wait in a queue ...
max_pending = 1024        # ... of at most this many (0-1000000, default 1024); beyond
                          # it a request fails at once with 503

[outlier_ejection]        # stop sending to an instance that keeps failing, for a while
enabled = true            # default true
consecutive_failures = 5  # failures in a row that eject an instance: connect failures,
                          # resets, per-try timeouts and 5xx responses (1-1000, default 5)
base_ejection_time = "30s"   # the first ejection lasts this long; the n-th ejection in a
                             # row lasts n times as long (default 30s, at most 1h) ...
max_ejection_time = "5m"     # ... but never longer than this (default 5m, at most 24h)
max_ejected_percent = 50  # at most this share of the instances out at once (0-100,
                          # default 50); still one when the service has two or more
"""

ACCESS = """\
# An access document: which services may call one service. The agents in front of the
# destination's instances enforce it on inbound requests.

kind = "access"           # route | resilience | access | fault | ratelimit | trust
name = "db-access"        # the document's identity in the mesh: [a-z0-9][a-z0-9._-]{0,62}
version = 1               # integer >= 1; publish every change with a higher version
description = "only the api and the workers reach the database"   # optional, free text
# expires = 2030-01-01T00:00:00Z   # optional, an offset date-time; after it the document is
                                   # dropped and every caller is allowed again

destination = "db"        # the service being called

default = "deny"          # required: "allow" or "deny", for callers no list below names
allow = ["api", "worker"] # source services let in; "*" lets in any caller, including one
                          # whose identity is unknown (default: none)
deny = []                 # source services kept out; deny beats allow, and "*" keeps out
                          # every caller (default: none). For example default = "allow"
                          # with deny = ["batch"] lets in everyone but batch.
# A caller whose identity is unknown is let in only by default = "allow" or by "*" in allow.
"""

TRUST = """\
# The trust document: the publisher keys every agent trusts for policy documents, and
# how many of them must sign. There is one per mesh; publishing a new version (signed as
# the current version requires) rotates the keys.

kind = "trust"            # route | resilience | access | fault | ratelimit | trust
name = "trust"            # always "trust"
version = 1               # integer >= 1; each rotation gets a higher version
description = "ops keys, 2025 rotation"   # optional, free text
# (no expires: a key set that expired would leave the mesh unable to accept anything)

keys = [                  # 1-32 public keys, no duplicates: a line of a .pub file written
                          # by `rumor keygen`, or the bare base64 key
  "rumor-ed25519 w858oo7II2G5/PujEmqBs2m/SPhaMnXSUVdvB2XA9YM= a8ebc03450363429",   # alice
  "rumor-ed25519 7UfbY1FqBIwAx9+D6ZGSVELX+57sKKyKpOVXm/cPhbE= 59692f7750765014",   # bob
]
threshold = 1             # signatures from distinct keys above that a document needs
                          # (1 to the number of keys)
"""

#: The expiry the printed fault example carries; ``example("fault", now)`` replaces it
#: with now + 1 h (a fault document expires at most 24 h after it is signed).
FAULT_EXPIRES_PLACEHOLDER = "2030-01-01T00:00:00Z"
FAULT_EXAMPLE_LIFETIME = 3600.0

FAULT = """\
# A fault document: delays and errors injected into the requests for one service, to test
# how its callers cope. The callers' sidecars inject them (outbound), before an instance
# is chosen; an injected fault is never retried and never counts as an instance's failure
# (circuit breaker, outlier ejection, retry budget). A delay counts toward the request's
# overall timeout.

kind = "fault"            # route | resilience | access | fault | ratelimit | trust
name = "web-fault"        # the document's identity in the mesh: [a-z0-9][a-z0-9._-]{0,62}
version = 1               # integer >= 1; publish every change with a higher version
description = "game day: web slow and failing for 1 hour"   # optional, free text
expires = 2030-01-01T00:00:00Z   # REQUIRED for a fault, at most 24h after signing
                          # (agents refuse a later one). `rumor policy example fault`
                          # writes now + 1h here; after it, agents drop the document and
                          # the faults stop.

service = "web"           # the destination service

# Rules, tried in order: the first whose conditions all hold applies to a request. A rule
# without conditions (as this one) applies to every request for the service.
[[rule]]
name = "slow-and-failing" # optional (default "rule[0]", ...); shown in decisions and logs
# sources = ["checkout"]  # only callers identifying as these services (default: any).
                          # A caller's identity is only trustworthy under mutual TLS:
                          # without it, any caller can claim any source.
# headers = [             # only requests with these headers (as in route rules: exact,
#   { name = "x-fault", exact = "1" },          # prefix or present)
#   { name = "x-user", prefix = "test-" },
#   { name = "x-no-fault", present = false },
# ]
# route_rule = "testers"  # only requests that took this rule of the service's route
delay = { duration = "200ms", percent = 10.0 }
                          # hold this share of the requests (more than 0, at most 100
                          # percent) for this long (more than 0, at most 60s) ...
abort = { status = 503, percent = 5.0 }
                          # ... and answer this share at once with this status (400-599),
                          # or reset the connection instead: abort = { reset = true,
                          # percent = 5.0 }. A rule has a delay, an abort or both.
"""

RATELIMIT = """\
# A rate limit document: how many requests per second one service takes, across the whole
# mesh. Each instance's sidecar (inbound) admits its share: rate x w / W, where w is its
# registered weight and W the sum of the live instances' weights. A request over the limit
# is answered 429 with Retry-After; callers do not retry it and it is not counted as the
# instance's failure.

kind = "ratelimit"        # route | resilience | access | fault | ratelimit | trust
name = "web-ratelimit"    # the document's identity in the mesh: [a-z0-9][a-z0-9._-]{0,62}
version = 1               # integer >= 1; publish every change with a higher version
description = "web takes 1000 req/s; batch at most 50"   # optional, free text
# expires = 2030-01-01T00:00:00Z   # optional, an offset date-time; after it: no limit

service = "web"           # the destination service

requests_per_second = 1000    # all callers together (more than 0, at most 10000000);
                              # optional when [[source]] limits are given
burst = "1s"              # how many seconds' worth of its share an instance admits at once
                          # (more than 0, at most 1m; default 1s)

[[source]]                # a limit of its own for callers identifying as one service
name = "batch"            # a service name, once per document (trustworthy under mTLS only)
requests_per_second = 50  # more than 0, at most 10000000; within the total above
"""


def example(kind: str, now: float | None = None) -> str:
    """The example of ``kind`` as ``rumor policy example`` prints it: with ``now`` (unix
    seconds), the fault example expires one hour after it."""
    text = EXAMPLES[kind]
    if kind == "fault" and now is not None:
        when = datetime.fromtimestamp(now + FAULT_EXAMPLE_LIFETIME, UTC).replace(
            microsecond=0).isoformat().replace("+00:00", "Z")
        text = text.replace(f"expires = {FAULT_EXPIRES_PLACEHOLDER}", f"expires = {when}", 1)
    return text


def canary_route(service: str, *, name: str | None = None, version: int = 1,
                 canary_weight: int = 10, canary_version: str | None = "v2",
                 canary_tags: Sequence[str] = (), tester_header: str | None = "x-canary",
                 header: bool = True) -> str:
    """A bare canary route (the example's core, without comments): subset "stable" is
    version v1, subset "canary" is ``canary_version`` and/or ``canary_tags``;
    ``canary_weight`` percent of requests go to the canary, and every request with
    ``tester_header: 1`` does. ``header=False`` leaves out kind, name and version (for
    a caller that writes its own). The demo, the simulator and the tests publish this
    rather than copies of it."""
    lines = ['kind = "route"', f'name = "{name or service + "-canary"}"',
             f"version = {version}"] if header else []
    lines += [f'service = "{service}"', "[[subset]]", 'name = "stable"', 'version = "v1"',
              "[[subset]]", 'name = "canary"']
    if canary_version is not None:
        lines.append(f'version = "{canary_version}"')
    if canary_tags:
        lines.append("tags = [" + ", ".join(f'"{t}"' for t in canary_tags) + "]")
    lines += ["[[split]]", 'subset = "stable"', f"weight = {100 - canary_weight}",
              "[[split]]", 'subset = "canary"', f"weight = {canary_weight}"]
    if tester_header is not None:
        lines += ["[[rule]]", 'name = "testers"',
                  f'headers = [{{ name = "{tester_header}", exact = "1" }}]',
                  'subset = "canary"']
    return "\n".join(lines) + "\n"


EXAMPLES: dict[str, str] = {
    "route": ROUTE,
    "resilience": RESILIENCE,
    "access": ACCESS,
    "fault": FAULT,
    "ratelimit": RATELIMIT,
    "trust": TRUST,
}

__all__ = ["EXAMPLES", "FAULT_EXPIRES_PLACEHOLDER", "canary_route", "example"]
