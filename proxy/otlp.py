# layer: shell — sends spans to an OTLP/HTTP collector (trio, httpcore, the wall clock)
"""The span exporter: batches from the ``SpanRecorder`` to ``--otlp URL`` over OTLP/HTTP.

One task, owned by the agent's nursery. It wakes when a batch is full or, for a partial
one, after ``INTERVAL`` seconds, encodes up to ``BATCH`` spans a few at a time (yielding between
chunks, so requests in flight are not held up behind a big batch), and POSTs them as
``application/x-protobuf``. One export is in flight at a time: while the collector is
slow or down the queue fills and the recorder drops and counts what does not fit, so
the data path never waits. A retryable failure (connection refused, timeout, 429, 502,
503, 504) is retried with backoff and ``Retry-After`` for up to a minute; anything else
drops the batch, counted and logged (rate-limited) with the collector's message.

The batch processor's standard environment variables apply (milliseconds as OpenTelemetry
has them): ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_EXPORTER_OTLP_TIMEOUT`` (``settings_from``).

``URL`` is the traces endpoint itself when it has a path (as
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), else ``/v1/traces`` is appended (as
``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpcore
import trio

from .spans import (
    BATCH,
    MAX_QUEUED,
    Backoff,
    Ended,
    ExportOutcome,
    SpanEncoder,
    SpanRecorder,
    read_answer,
)

log = logging.getLogger("rumor.otlp")

#: Longest the exporter waits before sending a partial batch (seconds).
INTERVAL = 1.0
#: Longest one export may take (seconds).
EXPORT_TIMEOUT = 10.0
#: Spans encoded between two yields to the scheduler.
CHUNK = 32
#: Longest the last export may hold up the agent's exit (seconds).
FLUSH_TIMEOUT = 2.0
#: Least time between two warnings about a failing collector.
LOG_EVERY = 30.0


def traces_url(url: str) -> str:
    """The traces endpoint for ``--otlp URL`` (ValueError for what is not http(s))."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--otlp {url!r}: expected http://HOST:PORT[/path] or https://…")
    if parts.path in ("", "/"):
        return url.rstrip("/") + "/v1/traces"
    return url


@dataclass(frozen=True)
class ExportSettings:
    queue: int = MAX_QUEUED
    batch: int = BATCH
    interval: float = INTERVAL
    timeout: float = EXPORT_TIMEOUT


def settings_from(env: Mapping[str, str]) -> ExportSettings:
    """The exporter's settings from OpenTelemetry's environment variables (ValueError
    naming the variable for a bad one)."""
    def number(name: str, default: float, least: float, most: float) -> float:
        raw = env.get(name)
        if raw is None or not raw.strip():
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected a number") from None
        if not least <= value <= most:
            raise ValueError(f"{name}={raw!r}: expected {least:g} to {most:g}")
        return value
    queue = int(number("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUED, 1, 1_000_000))
    batch = int(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", BATCH, 1, 1_000_000))
    return ExportSettings(
        queue=queue, batch=min(batch, queue),
        interval=number("OTEL_BSP_SCHEDULE_DELAY", INTERVAL * 1000, 1, 3_600_000) / 1000,
        timeout=number("OTEL_EXPORTER_OTLP_TIMEOUT", EXPORT_TIMEOUT * 1000, 1,
                       3_600_000) / 1000)


def wall_offset(samples: int = 5) -> float:
    """Unix time minus trio's clock. Of a few readings, the one whose two wall-clock
    reads are closest together: a read pre-empted between the two clocks would put
    spans milliseconds off, enough to misorder a child and its parent across sidecars."""
    best, spread = 0.0, float("inf")
    for _ in range(samples):
        before = time.time()
        now = trio.current_time()
        after = time.time()
        if after - before < spread:
            best, spread = (before + after) / 2 - now, after - before
    return best


class OtlpExporter:
    """Exports what ``recorder`` queues; its counters join the recorder's ``stats``:
    ``exported``, ``rejected`` (the collector refused them), ``dropped_export_failed``
    (retries ran out)."""

    def __init__(self, recorder: SpanRecorder, encoder: SpanEncoder, url: str, *,
                 interval: float = INTERVAL, timeout: float = EXPORT_TIMEOUT) -> None:
        self.recorder = recorder
        self.encoder = encoder
        self.url = traces_url(url)
        self.interval = interval
        self.timeout = timeout
        self._wake = trio.Event()
        recorder.on_batch = self._wake.set
        self._rng = random.Random()
        self._logged = float("-inf")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with httpcore.AsyncConnectionPool(max_connections=1) as http:
            task_status.started()
            try:
                await self._export_forever(http)
            finally:
                await self._flush(http)

    async def _flush(self, http: httpcore.AsyncConnectionPool) -> None:
        """As the agent stops: one last try, within ``FLUSH_TIMEOUT``, for what is
        queued (as an SDK's shutdown flushes), so a restart does not lose the last
        second's spans to a collector that is up."""
        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT):
            while self.recorder.pending:
                spans = self.recorder.take(self.recorder.batch)
                outcome = await self._post(http, await self._encode(spans), len(spans))
                self._count(outcome, len(spans))
                if outcome.retry:
                    break

    async def _export_forever(self, http: httpcore.AsyncConnectionPool) -> None:
        rec = self.recorder
        while True:
            # A full batch goes at once; a partial one waits for the interval. (Sending
            # whatever came in during the last export made exports of ~20 spans, each
            # paying a request's fixed cost: +28% CPU per request in the harness.)
            if len(rec.pending) < rec.batch:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
            self._wake = trio.Event()  # a wake-up set during the export is spent
            rec.on_batch = self._wake.set
            spans = rec.take(rec.batch)
            if spans:
                body = await self._encode(spans)
                await self._export(http, body, len(spans))

    async def _encode(self, spans: list[Ended]) -> bytes:
        batch = self.encoder.batch()
        offset = wall_offset()
        for i in range(0, len(spans), CHUNK):
            batch.add(spans[i:i + CHUNK], offset)
            await trio.sleep(0)
        return batch.encode()

    async def _export(self, http: httpcore.AsyncConnectionPool, body: bytes, n: int) -> None:
        stats = self.recorder.stats
        backoff = Backoff(self._rng)
        began = trio.current_time()
        while True:
            outcome = await self._post(http, body, n)
            if not outcome.retry:
                self._count(outcome, n)
                return
            wait = backoff.delay(trio.current_time() - began, outcome.retry_after)
            if wait is None:
                stats["dropped_export_failed"] += n
                self._warn("collector %s unreachable (%s): %d spans dropped", self.url,
                           outcome.message, n)
                return
            await trio.sleep(wait)

    def _count(self, outcome: ExportOutcome, n: int) -> None:
        stats = self.recorder.stats
        if outcome.retry:
            stats["dropped_export_failed"] += n
            return
        stats["exported"] += outcome.accepted
        stats["rejected"] += outcome.rejected
        if outcome.rejected or outcome.message:
            self._warn("collector %s refused %d of %d spans: %s", self.url,
                       outcome.rejected, n, outcome.message or "(no message)")

    async def _post(self, http: httpcore.AsyncConnectionPool, body: bytes,
                    n: int) -> ExportOutcome:
        t = self.timeout
        try:
            with trio.fail_after(t):
                r = await http.request(
                    "POST", self.url, content=body,
                    headers=[("content-type", "application/x-protobuf"),
                             ("user-agent", f"rumor/{self.encoder.version}")],
                    extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}})
        except (httpcore.TimeoutException, trio.TooSlowError):
            return ExportOutcome(0, 0, True, f"no answer in {t:g} s")
        except (httpcore.NetworkError, httpcore.ProtocolError) as e:
            return ExportOutcome(0, 0, True, str(e) or type(e).__name__)
        retry_after = next((v.decode("latin-1") for k, v in r.headers
                            if k.lower() == b"retry-after"), None)
        return read_answer(r.status, r.content, n, retry_after)

    def _warn(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning(message, *args, extra={"event": "otlp_export"})
