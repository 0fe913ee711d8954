"""Agent configuration files: every ``rumor agent`` option as a TOML key.

An agent that runs for months under a service manager is configured by files, not by
a long command line. The keys are the agent's long flag names with ``_`` for ``-``
(``bind``, ``join = [...]``, ``trust_key = [...]``), plus ``[[service]]`` tables. The
mapping is read off the agent's argparse definition instead of being kept by hand, so
a flag and its key can never drift apart, and each value goes through the flag's own
parser: a file and a command line get the same checks.

Merging, as Consul does it: files are read in the order given, a directory
contributes its ``*.toml`` files in name order; a later scalar replaces an earlier one,
lists and tables accumulate. Flags on the command line then replace scalars and add to
lists. Every error names the file, the key path and what was expected.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..gossip.fields import describe
from ..gossip.service_spec import SpecError, parse_spec, registration_from_mapping

#: Flags that make no sense inside a file.
NOT_IN_FILES = frozenset({"help", "config"})
#: Repeatable KEY=VALUE flags, which a file may also give as a table.
KEY_VALUE_LISTS = frozenset({"tag", "tune"})
#: At most this many files from one directory: a typo'd path such as ``/etc`` must not
#: make the agent parse a whole tree.
MAX_FILES = 256
MAX_FILE_BYTES = 1 << 20


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names file and key."""


@dataclass
class FileConfig:
    """What the files say, as argparse destinations with converted values."""

    values: dict[str, Any] = field(default_factory=dict)
    #: destination -> the file that last set it (``rumor config show`` reports it).
    origin: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def config_files(paths: Sequence[str]) -> list[Path]:
    """The files to read for ``--config`` PATHs, each a file or a directory."""
    out: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            try:
                found = sorted(c for c in p.iterdir() if c.suffix == ".toml" and c.is_file())
            except OSError as e:
                raise ConfigError(f"{text}: {e.strerror or e}") from None
            if len(found) > MAX_FILES:
                raise ConfigError(f"{text}: {len(found)} *.toml files, at most {MAX_FILES}")
            if not found:
                # An agent started on an empty directory would run with every default:
                # a typo'd path, not a configuration.
                raise ConfigError(f"{text}: a directory with no *.toml files")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise ConfigError(f"{text}: no such file or directory")
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES >> 10} KiB")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def file_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """key -> action, for every long flag of ``parser`` that a file may set."""
    keys = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs:
            continue
        key = longs[0][2:].replace("-", "_")
        if key not in NOT_IN_FILES and not isinstance(action, argparse._VersionAction):
            keys[key] = action
    return keys


def load(paths: Sequence[str], parser: argparse.ArgumentParser) -> FileConfig:
    """Read and merge the files behind ``paths``, converting each value with the
    parser's own types."""
    keys = file_keys(parser)
    out = FileConfig()
    for path in config_files(paths):
        out.files.append(str(path))
        doc = read_toml(path)
        for key, raw in doc.items():
            action = keys.get(key)
            if action is None:
                raise ConfigError(f"{path}: unknown key {key!r}{_suggest(key, keys)}")
            value = convert(action, raw, f"{path}: {key}")
            dest = action.dest
            if isinstance(action, argparse._AppendAction):
                out.values[dest] = out.values.get(dest, []) + value
            else:
                out.values[dest] = value
            out.origin[dest] = str(path)
    return out


def apply(parser: argparse.ArgumentParser, agent: argparse.ArgumentParser,
          argv: Sequence[str], config: FileConfig) -> argparse.Namespace:
    """Parse ``argv`` again with the files' values as the ``agent`` subcommand's
    defaults: flags replace scalars and add to lists."""
    saved = {a.dest: a.default for a in agent._actions if a.dest in config.values}
    try:
        agent.set_defaults(**config.values)
        return parser.parse_args(argv)
    finally:
        agent.set_defaults(**saved)


def convert(action: argparse.Action, raw: Any, where: str) -> Any:
    """One TOML value for ``action``, checked and converted as the flag would be."""
    if action.dest == "service":
        return _services(raw, where)
    if action.dest in KEY_VALUE_LISTS and isinstance(raw, Mapping):
        # ``[tag]`` / ``[tune]`` tables: each pair as the flag's KEY=VALUE would be.
        return [_one(action, f"{k}={_scalar_text(v, f'{where}.{k}')}", f"{where}.{k}")
                for k, v in raw.items()]
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [raw]
        return [_one(action, item, f"{where}[{i}]" if isinstance(raw, list) else where)
                for i, item in enumerate(items)]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: expected true or false, got {describe(raw)}")
        return raw if isinstance(action, argparse._StoreTrueAction) else not raw
    if action.nargs == "?" and isinstance(raw, bool):
        # ``dns = true``: the flag given alone (its default address); false: not given.
        return action.const if raw else None
    return _one(action, raw, where)


def _one(action: argparse.Action, raw: Any, where: str) -> Any:
    text = _scalar_text(raw, where)
    if action.type is not None:
        try:
            value = action.type(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            if action.type in (int, float):  # not Python's "invalid literal for int()"
                kind = "a whole number" if action.type is int else "a number"
                raise ConfigError(f"{where}: expected {kind}, got {text!r}") from None
            raise ConfigError(f"{where}: {e}") from None
    else:
        value = text
    if not isinstance(raw, str) and not isinstance(value, int | float):
        # ``bind = 7946`` would read as the host "7946": a number where text belongs
        # is a mistake, not a spelling.
        raise ConfigError(f"{where}: expected a string, got {describe(raw)}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {text!r} is not one of "
                          f"{', '.join(map(str, action.choices))}")
    return value


def _scalar_text(raw: Any, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ConfigError(f"{where}: expected a string or a number, got {describe(raw)}")
    return str(raw)


def _services(raw: Any, where: str) -> list[Any]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]" if isinstance(raw, list) else where
        try:
            out.append(parse_spec(item) if isinstance(item, str)
                       else registration_from_mapping(item, at))
        except SpecError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(at) else f"{at}: {msg}") from None
    return out


def _suggest(key: str, keys: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(keys), n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (keys are the long flag names " \
        "of `rumor agent --help` with _ for -)"


def settings(args: argparse.Namespace, agent: argparse.ArgumentParser) -> dict[str, Any]:
    """Every key's effective value, as a file would spell it (unset ones left out).

    Files name key files by path and nothing here reads them, so no key material ever
    reaches ``rumor config show``."""
    from ..gossip.service_spec import registration_to_mapping
    out: dict[str, Any] = {}
    for key, action in file_keys(agent).items():
        value = getattr(args, action.dest, None)
        if value is None or value == []:
            continue
        if action.dest == "service":
            out[key] = [registration_to_mapping(r) for r in value]
        elif action.dest == "tag":
            out[key] = {k: v for k, v in value}
        elif action.dest == "tune":
            out[key] = dict(item.partition("=")[::2] for item in value)
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    from ..gossip.address import format_address
    from ..proxy.tcp_spec import Upstream
    if isinstance(value, Upstream):
        return str(value)  # SERVICE=HOST:PORT, as --upstream takes it
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return format_address(value)  # an address
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_toml(values: Mapping[str, Any]) -> str:
    """``values`` (from :func:`settings`) as a config file that loads back to them."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if key == "service":
            for svc in value:
                tables += ["", "[[service]]"] + [f"{_key(k)} = {_value(v)}"
                                                 for k, v in svc.items()]
        elif isinstance(value, Mapping):
            tables += ["", f"[{_key(key)}]"] + [f"{_key(k)} = {_value(v)}"
                                                for k, v in value.items()]
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    return "\n".join(lines + tables) + "\n"


def _key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) \
        else _value(k)


def _value(v: Any) -> str:
    import json
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        # JSON's escapes are TOML basic-string escapes; TOML also wants DEL escaped.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
