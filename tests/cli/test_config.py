"""Agent configuration files: every option through a file and through flags gives the
same agent; files merge in order; bad files are refused with the file and key path;
``rumor config show``'s TOML loads back to the same settings."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rumor.cli.config import ConfigError, config_files, file_keys, load, settings, to_toml
from rumor.cli.main import UsageError, agent_options, build_parser, parse_agent_args, subparser
from rumor.gossip.keyring_file import generate_key
from rumor.policy.keys import write_keypair
from rumor.proxy.ca import init_ca, issue


def _agent_parser() -> argparse.ArgumentParser:
    return subparser(build_parser(), "agent")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """Files the options point at: two publisher keys, a keyring, TLS files, a token."""
    _, pub1, _ = write_keypair(tmp_path / "ops1")
    _, pub2, _ = write_keypair(tmp_path / "ops2")
    ring = tmp_path / "keyring"
    ring.write_text(generate_key() + "\n")
    ring.chmod(0o600)
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    init_ca(tmp_path / "ca", "test")
    cert, key = issue(tmp_path / "ca", "n1", ["web"], 30, tmp_path / "n1")
    return {"pub1": str(pub1), "pub2": str(pub2), "ring": str(ring), "token": str(token),
            "ca": str(tmp_path / "ca" / "ca.crt"), "cert": str(cert), "key": str(key),
            "dir": str(tmp_path / "data"), "log": str(tmp_path / "access.log"),
            "trace": str(tmp_path / "trace.jsonl")}


def samples(k: dict[str, str]) -> dict[str, tuple[list[str], Any]]:
    """For every agent option: (its flags, the same as a file value)."""
    return {
        "name": (["--name", "n1"], "n1"),
        "bind": (["--bind", "127.0.0.1:17946"], "127.0.0.1:17946"),
        "advertise": (["--advertise", "127.0.0.2:17946"], "127.0.0.2:17946"),
        "api": (["--api", "127.0.0.1:17947"], "127.0.0.1:17947"),
        "join": (["--join", "127.0.0.1:1", "--join", "127.0.0.1:2"],
                 ["127.0.0.1:1", "127.0.0.1:2"]),
        "retry_join": (["--retry-join", "127.0.0.1:3", "--retry-join", "seed.example"],
                       ["127.0.0.1:3", "seed.example:7946"]),
        "retry_interval": (["--retry-interval", "5"], 5),
        "rejoin_after_leave": (["--rejoin-after-leave"], True),
        "profile": (["--profile", "wan"], "wan"),
        "tag": (["--tag", "rack=r1", "--tag", "zone=z"], {"rack": "r1", "zone": "z"}),
        "service": (["--service", "name=web,port=8080,tags=blue|canary,check=ttl,ttl=30s"],
                    [{"name": "web", "port": 8080, "tags": ["blue", "canary"],
                      "check": "ttl", "ttl": "30s"}]),
        "dns": (["--dns", "127.0.0.1:18600"], "127.0.0.1:18600"),
        "dns_service_ttl": (["--dns-service-ttl", "30"], 30),
        "dns_node_ttl": (["--dns-node-ttl", "300"], 300),
        "outbound": (["--outbound"], True),
        "inbound": (["--inbound", "127.0.0.1:15099"], "127.0.0.1:15099"),
        "identity": (["--identity", "web"], "web"),
        "upstream": (["--upstream", "db=127.0.0.1:15432"], ["db=127.0.0.1:15432"]),
        "tcp_idle_timeout": (["--tcp-idle-timeout", "60"], 60.0),
        "balancer_decay": (["--balancer-decay", "2.5"], 2.5),
        "inbound_connections": (["--inbound-connections", "500"], 500),
        "inbound_per_client": (["--inbound-per-client", "100"], 100),
        "outbound_connections": (["--outbound-connections", "300"], 300),
        "outbound_per_client": (["--outbound-per-client", "200"], 200),
        "first_byte_timeout": (["--first-byte-timeout", "2.5"], 2.5),
        "access_log": (["--access-log", k["log"]], k["log"]),
        "otlp": (["--otlp", "http://127.0.0.1:4318"], "http://127.0.0.1:4318"),
        "trace_sample": (["--trace-sample", "0.25"], 0.25),
        "trust_key": (["--trust-key", k["pub1"], "--trust-key", k["pub2"]],
                      [k["pub1"], k["pub2"]]),
        "trust_threshold": (["--trust-threshold", "2"], 2),
        "data_dir": (["--data-dir", k["dir"]], k["dir"]),
        "node_identity": (["--node-identity", "prefer"], "prefer"),
        "node_tofu": (["--node-tofu"], True),
        "node_ca": (["--node-ca", k["ca"]], k["ca"]),
        "node_cluster": (["--node-cluster", "prod"], "prod"),
        "tls_ca": (["--tls-ca", k["ca"]], k["ca"]),
        "tls_cert": (["--tls-cert", k["cert"]], k["cert"]),
        "tls_key": (["--tls-key", k["key"]], k["key"]),
        "keyring": (["--keyring", k["ring"]], k["ring"]),
        "api_token_file": (["--api-token-file", k["token"]], k["token"]),
        "api_allow_host": (["--api-allow-host", "agent.example"], ["agent.example"]),
        "tune": (["--tune", "user_retransmit_mult=6"], {"user_retransmit_mult": 6}),
        "trace_gossip": (["--trace-gossip", k["trace"]], k["trace"]),
        "log_format": (["--log-format", "json"], "json"),
        "log_level": (["--log-level", "debug"], "debug"),
    }


def _write(path: Path, values: dict[str, Any]) -> Path:
    """``values`` as TOML: services as [[service]] tables, mappings as tables."""
    path.write_text(to_toml({k: v for k, v in values.items()}))
    return path


def test_every_agent_option_has_a_sample(keys: dict[str, str]) -> None:
    # A new flag must be added to samples(), so the next test covers it.
    assert set(file_keys(_agent_parser())) == set(samples(keys))


def test_every_option_through_a_file_or_through_flags_gives_the_same_agent(
        tmp_path: Path, keys: dict[str, str]) -> None:
    s = samples(keys)
    flags = [x for argv, _ in s.values() for x in argv]
    by_flags = agent_options(parse_agent_args(["agent", *flags]))
    path = _write(tmp_path / "all.toml", {k: v for k, (_, v) in s.items()})
    by_file = agent_options(parse_agent_args(["agent", "--config", str(path)]))
    assert by_file.settings == by_flags.settings
    for field in ("name", "bind", "advertise", "api", "join", "retry_join", "retry_interval",
                  "rejoin_after_leave", "profile", "tags", "services", "dns",
                  "dns_service_ttl", "dns_node_ttl", "outbound", "inbound", "identity",
                  "balancer_decay", "proxy_limits", "access_log", "data_dir", "tls", "keyring_file",
                  "api_token_file", "trace_gossip", "gossip", "otlp", "trace_sample"):
        assert getattr(by_file, field) == getattr(by_flags, field), field
    assert by_file.trust is not None and by_flags.trust is not None
    assert by_file.trust.ids() == by_flags.trust.ids()
    assert by_file.trust.threshold == 2
    assert by_file.api_access == by_flags.api_access
    assert by_file.keyring is not None and by_flags.keyring is not None
    assert by_file.keyring.keys == by_flags.keyring.keys


def test_show_prints_a_file_that_loads_back_to_the_same_settings(
        tmp_path: Path, keys: dict[str, str]) -> None:
    s = samples(keys)
    opts = agent_options(parse_agent_args(["agent", *[x for a, _ in s.values() for x in a]]))
    again = _write(tmp_path / "again.toml", opts.settings)
    back = agent_options(parse_agent_args(["agent", "--config", str(again)]))
    assert back.settings == opts.settings


def test_flags_replace_a_files_scalars_and_add_to_its_lists(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('name = "from-file"\njoin = ["127.0.0.1:1"]\nprofile = "wan"\n'
                    '[tag]\nrack = "r1"\n')
    args = parse_agent_args(["agent", "--config", str(path), "--name", "from-flag",
                             "--join", "127.0.0.1:2", "--tag", "zone=z"])
    opts = agent_options(args)
    assert opts.name == "from-flag"
    assert opts.profile == "wan"
    assert opts.join == ["127.0.0.1:1", "127.0.0.1:2"]
    assert opts.tags == {"rack": "r1", "zone": "z"}
    assert opts.config_files == [str(path)]


def test_a_directory_is_read_in_name_order_later_files_winning(tmp_path: Path) -> None:
    d = tmp_path / "rumor.d"
    d.mkdir()
    (d / "20-site.toml").write_text('name = "second"\njoin = ["127.0.0.1:2"]\n'
                                    '[[service]]\nname = "db"\nport = 5432\n')
    (d / "10-base.toml").write_text('name = "first"\nlog_level = "debug"\n'
                                    'join = ["127.0.0.1:1"]\n'
                                    '[[service]]\nname = "web"\nport = 80\n')
    (d / "notes.txt").write_text("not read")
    opts = agent_options(parse_agent_args(["agent", "--config", str(d)]))
    assert opts.name == "second"
    assert opts.settings["log_level"] == "debug"
    assert opts.join == ["127.0.0.1:1", "127.0.0.1:2"]
    assert [r.service.name for r in opts.services] == ["web", "db"]
    assert [Path(f).name for f in opts.config_files] == ["10-base.toml", "20-site.toml"]


def test_dns_true_means_the_flag_given_alone(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("dns = true\noutbound = false\n")
    opts = agent_options(parse_agent_args(["agent", "--config", str(path)]))
    assert opts.dns == ("127.0.0.1", 8600)
    assert opts.outbound is None


@pytest.mark.parametrize(("text", "message"), [
    ('bnd = "x"\n', "a.toml: unknown key 'bnd' (did you mean 'bind'?)"),
    ('bind = "host:99999"\n', "a.toml: bind: bad address 'host:99999'"),
    ("bind = 7946\n", "a.toml: bind: expected a string, got an integer"),
    ('join = ["127.0.0.1:1", 5]\n', "a.toml: join[1]: "),
    ("join = [[1]]\n", "a.toml: join[0]: expected a string or a number, got list of 1"),
    ('profile = "fast"\n', "a.toml: profile: 'fast' is not one of lan, local, wan"),
    ("trust_threshold = true\n", "a.toml: trust_threshold: expected a string or a number"),
    ("balancer_decay = -1\n", "a.toml: balancer_decay: expected a positive number"),
    ("dns_service_ttl = -5\n", "a.toml: dns_service_ttl: expected 0 to 86400 seconds"),
    ("dns_node_ttl = 1.5\n", "a.toml: dns_node_ttl: expected whole seconds, got '1.5'"),
    ("[tag]\nrack = [1]\n", "a.toml: tag.rack: expected a string or a number"),
    ('[tune]\nno_such = 1\n', "no_such"),
    ("[[service]]\nname = \"web\"\n", "a.toml: service[0]: service 'web': field 'port'"),
    ('[[service]]\nname = "web"\nport = 80\nbnd = 1\n', "unknown field 'bnd'"),
    ("config = 'other.toml'\n", "a.toml: unknown key 'config'"),
    ("name = \n", "a.toml: not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        agent_options(parse_agent_args(["agent", "--config", str(path)]))
    assert message in str(e.value)
    assert str(path) in str(e.value) or "no_such" in message


@pytest.mark.parametrize(("argv", "message"), [
    (["--dns-service-ttl", "-1"], "--dns-service-ttl: expected 0 to 86400 seconds (a day)"),
    (["--dns-node-ttl", "1e9"], "--dns-node-ttl: expected whole seconds, got '1e9'"),
])
def test_a_bad_dns_ttl_flag_is_refused_in_one_line(
        capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        parse_agent_args(["agent", *argv])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_paths_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or directory"):
        config_files([str(tmp_path / "nope.toml")])
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load([str(bad)], _agent_parser())


def test_settings_name_key_files_by_path_and_hold_no_key_material(
        keys: dict[str, str]) -> None:
    s = samples(keys)
    args = parse_agent_args(["agent", *[x for a, _ in s.values() for x in a]])
    text = to_toml(settings(args, _agent_parser()))
    assert "s3cret-token" not in text
    assert Path(keys["ring"]).read_text().strip() not in text
    assert keys["token"] in text and keys["ring"] in text


printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(st.dictionaries(printable.filter(bool), printable, max_size=5), printable)
def test_to_toml_writes_any_text_so_that_tomllib_reads_it_back(
        table: dict[str, str], value: str) -> None:
    doc = {"name": value, "tag": table, "join": [value, "x"]}
    assert tomllib.loads(to_toml(doc)) == doc


@pytest.mark.parametrize(("text", "message"), [
    ('trust_key = ["/nonexistent.pub"]\n', "a.toml: trust_key: /nonexistent.pub: "),
    ('name = ""\n', "a.toml: name: must be 1 to 128 characters"),
    ('trust_threshold = "two"\n', "a.toml: trust_threshold: expected a whole number, "
                                  "got 'two'"),
    ('join = ["10.0.0.3:99999"]\n', "a.toml: join[0]: bad address '10.0.0.3:99999'"),
])
def test_checks_after_parsing_name_the_file_and_key_too(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        agent_options(parse_agent_args(["agent", "--config", str(path)]))
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_a_flag_given_on_the_command_line_is_named_as_a_flag(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('name = "fine"\n')
    with pytest.raises(UsageError, match=r"^--name must be"):
        agent_options(parse_agent_args(["agent", "--config", str(path), "--name", ""]))


def test_an_empty_config_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a directory with no \*\.toml files"):
        config_files([str(tmp_path)])


@pytest.mark.parametrize(("argv", "message"), [
    (["--otlp", "ftp://collector"], "expected http://HOST:PORT"),
    (["--otlp", "http://"], "expected http://HOST:PORT"),
])
def test_a_bad_otlp_url_is_a_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        agent_options(parse_agent_args(["agent", *argv]))


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "half"])
def test_a_bad_sampling_ratio_is_refused(ratio: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_agent_args(["agent", "--trace-sample", ratio])
    assert "--trace-sample" in capsys.readouterr().err


def test_otlp_urls_name_the_traces_endpoint() -> None:
    assert agent_options(parse_agent_args(
        ["agent", "--otlp", "http://127.0.0.1:4318"])).otlp == "http://127.0.0.1:4318/v1/traces"
    assert agent_options(parse_agent_args(
        ["agent", "--otlp", "http://c:4318/x/traces"])).otlp == "http://c:4318/x/traces"
