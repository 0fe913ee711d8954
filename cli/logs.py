"""Logging for the `rumor` command: readable text for people, JSON lines for machines.

The agent logs to stderr. With `--log-format json` every line is one JSON object:
`{"ts": ..., "level": ..., "logger": ..., "msg": ..., <extra fields>}`. Structured
events (`log_event`) are the contract benchmarks and operators parse: in JSON their
line is exactly the event's keys plus `ts` and `level`, e.g.
`{"ts":"2024-05-01T12:00:00.123Z","level":"info","event":"member","member":"a",
"status":"alive",...}`; in text mode they read as a sentence
(`member a is alive (incarnation 3, 127.0.0.1:7946)`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

# The LogRecord attribute that carries a structured event from log_event to formatters.
_EVENT_ATTR = "rumor_event"
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName", _EVENT_ATTR}

EventRenderer = Callable[[Mapping[str, Any]], str]
_RENDERERS: dict[str, EventRenderer] = {}


def configure_logging(
    fmt: LogFormat = "text", level: int | str = "info", stream: TextIO | None = None
) -> logging.Handler:
    """Send all logging to `stream` (stderr by default) in `fmt`; returns the handler.

    Replaces whatever handlers the root logger had, so calling it twice (tests, an
    embedding program re-configuring) never duplicates lines.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: expected 'text' or 'json'")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_parse_level(level))
    return handler


def log_event(logger: logging.Logger, event: Mapping[str, Any], level: int = logging.INFO) -> None:
    """Log a structured event (a JSON-ready mapping with an "event" key).

    The record's message is the text rendering, so any handler (pytest's caplog, an
    embedding program's own) still gets a readable line.
    """
    if logger.isEnabledFor(level):
        logger.log(level, "%s", describe_event(event), extra={_EVENT_ATTR: dict(event)})


def register_event_text(event: str, render: EventRenderer) -> None:
    """Teach text mode to render `{"event": event, ...}` as a sentence."""
    _RENDERERS[event] = render


def describe_event(event: Mapping[str, Any]) -> str:
    """The text-mode sentence for an event; unknown events render as `name k=v ...`."""
    render = _RENDERERS.get(str(event.get("event")))
    if render is not None:
        return render(event)
    rest = " ".join(f"{k}={_text_value(v)}" for k, v in event.items() if k != "event")
    return f"{event.get('event', 'event')} {rest}".rstrip()


def _describe_member(event: Mapping[str, Any]) -> str:
    details = [f"incarnation {event.get('incarnation', '?')}"]
    if event.get("addr"):
        details.append(str(event["addr"]))
    return f"member {event.get('member')} is {event.get('status')} ({', '.join(details)})"


register_event_text("member", _describe_member)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; non-JSON values are stringified, never dropped."""

    def format(self, record: logging.LogRecord) -> str:
        head: dict[str, Any] = {"ts": _timestamp(record), "level": _level_name(record)}
        event = getattr(record, _EVENT_ATTR, None)
        if isinstance(event, dict):
            # ts and level come from the logger (an event's own would be shadowed).
            doc = {**head, **{k: v for k, v in event.items() if k not in head}}
        else:
            doc = {**head, "logger": record.name, "msg": record.getMessage()}
            doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TS LEVEL logger: message key=value ...` with tracebacks on following lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {_level_name(record).upper():<7} "
            f"{record.name}: {record.getMessage()}"
        )
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    ts = datetime.fromtimestamp(record.created, tz=UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _level_name(record: logging.LogRecord) -> str:
    return record.levelname.lower()


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


def _parse_level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value
