"""Settings: defaults < file < MQTT_BACKUP_* environment < flags, and a ConfigError per bad value.

The autouse `clean_env` fixture (conftest.py) runs every test in an empty temporary directory with
no MQTT_BACKUP_* variables set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mqtt_backup import config
from mqtt_backup.config import (
    BrokerAddress,
    LogFormat,
    LogLevel,
    ProtocolVersion,
    ResponseTopics,
    Settings,
    Transport,
    mask_url,
    parse_broker_url,
)
from mqtt_backup.errors import EXIT_USAGE, ConfigError
from mqtt_backup.storage.store import DEFAULT_PARTITIONS


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    return config.load(flags or {}, env or {}, config_file)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> str:
    """The message of the ConfigError that loading these settings raises."""
    with pytest.raises(ConfigError) as info:
        load(flags, env, config_file)
    assert info.value.exit_code == EXIT_USAGE
    message = str(info.value)
    assert message.startswith("bad configuration: ")
    assert "\n" not in message
    return message


# --- precedence ----------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load()
    assert settings == Settings()
    assert settings.broker == "mqtt://127.0.0.1:1883"
    assert settings.data == Path("mqtt-backup-data")
    assert settings.topic == ("devices/{device}/#",)
    assert settings.namespace == "backup"
    assert settings.protocol is ProtocolVersion.V5
    assert settings.log_level is LogLevel.INFO
    assert settings.response_topics is ResponseTopics.STRICT
    assert settings.client_id is None
    assert settings.partitions is None
    assert settings.broker_address == BrokerAddress("127.0.0.1", 1883)
    assert [t.filter for t in settings.templates] == ["devices/+/#"]


def test_default_config_file_in_the_cwd_is_read() -> None:
    write(Path("mqtt-backup.toml"), 'namespace = "from-file"\nkeepalive = 60\n')
    settings = load()
    assert settings.namespace == "from-file"
    assert settings.keepalive == 60


def test_no_default_config_file_is_fine() -> None:
    assert not Path("mqtt-backup.toml").exists()
    assert load() == Settings()


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        'namespace = "file"\nclient_id = "file"\nkeepalive = 40\nbatch_ms = 7\n',
    )
    env = {"MQTT_BACKUP_CLIENT_ID": "env", "MQTT_BACKUP_KEEPALIVE": "50"}
    flags = {"keepalive": 60, "namespace": None}  # None means "flag not given"
    settings = load(flags, env, path)
    assert settings.batch_max == Settings().batch_max  # default
    assert settings.batch_ms == 7  # file
    assert settings.namespace == "file"  # file (the flag was not given)
    assert settings.client_id == "env"  # env over file
    assert settings.keepalive == 60  # flag over env and file


def test_explicit_config_wins_over_the_default_file(tmp_path: Path) -> None:
    write(Path("mqtt-backup.toml"), 'namespace = "default-file"\n')
    other = write(tmp_path / "other.toml", 'namespace = "other-file"\n')
    assert load(config_file=other).namespace == "other-file"


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    write(Path("mqtt-backup.toml"), 'namespace = "default-file"\n')
    other = write(tmp_path / "env.toml", 'namespace = "env-file"\n')
    third = write(tmp_path / "flag.toml", 'namespace = "flag-file"\n')
    assert load(env={"MQTT_BACKUP_CONFIG": str(other)}).namespace == "env-file"
    assert load(env={"MQTT_BACKUP_CONFIG": str(other)}, config_file=third).namespace == "flag-file"


def test_real_environment_through_monkeypatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_BACKUP_BROKER", "mqtts://user:secret@broker.example")
    monkeypatch.setenv("MQTT_BACKUP_PARTITIONS", "4")
    monkeypatch.setenv("MQTT_BACKUP_DATA", "/srv/backup")
    settings = config.load({}, os.environ)
    assert settings.broker_address == BrokerAddress(
        "broker.example", 8883, tls=True, username="user", password="secret"
    )
    assert settings.partitions == 4
    assert settings.data == Path("/srv/backup")


def test_empty_environment_value_is_unset() -> None:
    settings = load(env={"MQTT_BACKUP_NAMESPACE": "", "MQTT_BACKUP_PARTITIONS": ""})
    assert settings.namespace == "backup"
    assert settings.partitions is None


def test_every_option_has_an_environment_variable(tmp_path: Path) -> None:
    pems = {name: write(tmp_path / f"{name}.pem", "-") for name in ("ca", "cert", "key")}
    secret = write(tmp_path / "password", "pw\n")
    values = {
        "broker": "mqtts://u@h:1",
        "data": "/d",
        "topic": "x/{device}",
        "client_id": "c",
        "partitions": "2",
        "namespace": "ns",
        "group": "g",
        "instance": "i",
        "protocol": "3.1.1",
        "transport": "paho",
        "metrics_port": "9100",
        "metrics_bind": "0.0.0.0",
        "password_file": str(secret),
        "password": "not used: the file wins",
        "ca": str(pems["ca"]),
        "cert": str(pems["cert"]),
        "key": str(pems["key"]),
        "session_expiry": "60",
        "keepalive": "10",
        "batch_max": "5",
        "batch_ms": "3",
        "log_level": "debug",
        "log_format": "json",
        "max_packet_size": "100000",
        "response_topics": "any",
        "prune_older_than": "30d",
        "prune_max_bytes_per_device": "1000000",
    }
    assert set(values) == set(config.field_names())
    settings = load(env={f"MQTT_BACKUP_{k.upper()}": v for k, v in values.items()})
    assert settings == Settings(
        broker="mqtts://u@h:1",
        data=Path("/d"),
        topic=("x/{device}",),
        client_id="c",
        partitions=2,
        namespace="ns",
        group="g",
        instance="i",
        protocol=ProtocolVersion.V311,
        transport=Transport.PAHO,
        metrics_port=9100,
        metrics_bind="0.0.0.0",
        password_file=secret,
        password="not used: the file wins",
        ca=pems["ca"],
        cert=pems["cert"],
        key=pems["key"],
        session_expiry=60,
        keepalive=10,
        batch_max=5,
        batch_ms=3,
        log_level=LogLevel.DEBUG,
        log_format=LogFormat.JSON,
        max_packet_size=100_000,
        response_topics=ResponseTopics.ANY,
        prune_older_than="30d",
        prune_max_bytes_per_device=1_000_000,
    )
    assert settings.broker_address.password == "pw"
    assert settings.metrics_address == ("0.0.0.0", 9100)
    assert isinstance(settings.protocol, ProtocolVersion)
    assert isinstance(settings.log_level, LogLevel)
    assert isinstance(settings.response_topics, ResponseTopics)


def test_topic_list_from_environment_is_comma_separated() -> None:
    env = {"MQTT_BACKUP_TOPIC": "devices/{device}/#, tele/{device}/+ ,,zigbee2mqtt/{device}"}
    settings = load(env=env)
    assert settings.topic == ("devices/{device}/#", "tele/{device}/+", "zigbee2mqtt/{device}")
    assert [t.filter for t in settings.templates] == ["devices/+/#", "tele/+/+", "zigbee2mqtt/+"]


def test_topic_list_from_file_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'topic = ["a/{device}", "b/{device}/#"]\n')
    assert load(config_file=path).topic == ("a/{device}", "b/{device}/#")
    flags = {"topic": ["c/{device}"]}
    assert load(flags, {"MQTT_BACKUP_TOPIC": "d/{device}"}, path).topic == ("c/{device}",)


def test_file_keys_with_dash_or_underscore(tmp_path: Path) -> None:
    dashed = write(tmp_path / "d.toml", 'client-id = "x"\nbatch-max = 9\nlog-level = "error"\n')
    under = write(tmp_path / "u.toml", 'client_id = "x"\nbatch_max = 9\nlog_level = "error"\n')
    assert load(config_file=dashed) == load(config_file=under)
    settings = load(config_file=dashed)
    assert (settings.client_id, settings.batch_max, settings.log_level) == ("x", 9, LogLevel.ERROR)


def test_file_value_types(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        'data = "~/backup"\npartitions = 8\nmetrics_port = "9100"\nlog_level = "WARNING"\n',
    )
    settings = load(config_file=path)
    assert settings.data == Path("~/backup").expanduser()
    assert settings.partitions == 8
    assert settings.metrics_port == 9100
    assert settings.log_level is LogLevel.WARNING  # any letter case, one value


def test_flags_accept_parsed_values() -> None:
    settings = load({"data": Path("/x"), "partitions": 3, "topic": ("a/{device}",)})
    assert (settings.data, settings.partitions, settings.topic) == (Path("/x"), 3, ("a/{device}",))


def test_with_overrides() -> None:
    assert config.with_overrides(Settings(), namespace="x").namespace == "x"


# --- declarations --------------------------------------------------------------------------------


def test_names_derive_from_the_declaration() -> None:
    assert config.flag_name("client_id") == "--client-id"
    assert config.env_name("client_id") == "MQTT_BACKUP_CLIENT_ID"
    assert config.field_names()[:3] == ("broker", "data", "topic")


def test_help_shows_the_default() -> None:
    assert config.help_for("keepalive") == "MQTT keepalive seconds [default: 30]"
    assert config.help_for("data") == "data directory [default: ./mqtt-backup-data]"
    assert config.help_for("topic").endswith("[default: devices/{device}/#]")
    assert config.help_for("protocol") == "5 or 3.1.1 [default: 5]"
    # The text is the store's own default (config does not import the store, to stay light).
    assert config.help_for("partitions").endswith(f"[default: {DEFAULT_PARTITIONS}]")
    assert config.help_for("metrics_port") == "serve Prometheus metrics on 127.0.0.1:PORT/metrics"


def test_every_setting_is_explained() -> None:
    for name in config.field_names():
        declared = config.declared(name)
        assert declared.help, name
        for choice in declared.choices:  # a help that lists the choices names all of them
            assert choice in declared.help, (name, choice)
    assert config.declared("protocol").choices == ("5", "3.1.1")
    assert config.declared("log_level").choices == ("debug", "info", "warning", "error")
    assert config.declared("response_topics").choices == ("strict", "any")


def test_unknown_setting_name() -> None:
    with pytest.raises(KeyError):
        config.declared("colour")


@pytest.mark.parametrize(
    ("name", "raw", "value"),
    [
        ("topic", " a/{device} ,b/{device}/#", ("a/{device}", "b/{device}/#")),
        ("topic", ["a/{device}"], ("a/{device}",)),
        ("partitions", "7", 7),
        ("keepalive", 5, 5),
        ("data", "/srv/x", Path("/srv/x")),
        ("protocol", "3.1.1", ProtocolVersion.V311),
        ("protocol", 5, ProtocolVersion.V5),
        ("log_level", "Debug", LogLevel.DEBUG),
        ("response_topics", "any", ResponseTopics.ANY),
        ("prune_older_than", "30d", "30d"),
        ("namespace", "ops/backup", "ops/backup"),
        ("broker", "mqtts://h", "mqtts://h"),
        ("client_id", "c-1", "c-1"),
    ],
)
def test_validate_returns_the_checked_value(name: str, raw: object, value: object) -> None:
    assert config.declared(name).validate(raw) == value


def test_validate_returns_an_existing_file(tmp_path: Path) -> None:
    pem = write(tmp_path / "ca.pem", "-")
    assert config.declared("ca").validate(str(pem)) == pem


# --- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ('brokr = "mqtt://x"', "'brokr'"),
        ("[broker]\nhost = 'x'", "'broker'"),
        ("partitions = 'many'", "'partitions'"),
        ("partitions = 2.5", "'partitions'"),
        ("partitions = true", "'partitions'"),
        ("keepalive = [30]", "'keepalive'"),
        ("namespace = 5", "'namespace'"),
        ("protocol = 4", "'protocol'"),
        ("topic = [1, 2]", "'topic'"),
        ("topic = 7", "'topic'"),
        ("data = 1", "'data'"),
        ("client-id = 3", "'client-id'"),
        ("log_level = false", "'log_level'"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, toml: str, names: str) -> None:
    path = write(tmp_path / "c.toml", toml + "\n")
    message = config_error(config_file=path)
    assert names in message
    assert str(path) in message


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(config_file=write(tmp_path / "c.toml", "colour = 'blue'\n"))
    assert "unknown key 'colour'" in str(info.value)
    for name in config.field_names():
        assert name in info.value.hint


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MQTT_BACKUP_PARTITIONS": "two"}, "MQTT_BACKUP_PARTITIONS"),
        ({"MQTT_BACKUP_METRICS_PORT": "9100.5"}, "MQTT_BACKUP_METRICS_PORT"),
        ({"MQTT_BACKUP_KEEPALIVE": "0x10"}, "MQTT_BACKUP_KEEPALIVE"),
    ],
)
def test_bad_environment_values_name_the_variable(env: dict[str, str], names: str) -> None:
    message = config_error(env=env)
    assert names in message
    assert repr(next(iter(env.values()))) in message


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        ({"partitions": "x"}, "--partitions "),
        ({"partitions": True}, "--partitions "),
        ({"namespace": 3}, "--namespace "),
        ({"topic": [1]}, "--topic "),
    ],
)
def test_bad_flag_values_name_the_flag(flags: dict[str, Any], names: str) -> None:
    assert names in config_error(flags)


@pytest.mark.parametrize(
    ("name", "bad", "low", "high"),
    [
        ("partitions", 0, 1, 1024),
        ("partitions", 1025, 1, 1024),
        ("metrics_port", 0, 1, 65535),
        ("metrics_port", 65536, 1, 65535),
        ("session_expiry", 0, 1, 0xFFFFFFFF),
        ("session_expiry", 2**32, 1, 0xFFFFFFFF),
        ("keepalive", 4, 5, 65535),
        ("keepalive", -1, 5, 65535),
        ("batch_max", 0, 1, 100_000),
        ("batch_max", 100_001, 1, 100_000),
        ("batch_ms", 0, 1, 10_000),
        ("batch_ms", 10_001, 1, 10_000),
    ],
)
def test_out_of_range_numbers(name: str, bad: int, low: int, high: int) -> None:
    message = config_error({name: bad})
    flag = "--" + name.replace("_", "-")
    assert f"{flag}: must be between {low} and {high}, got {bad}" in message
    # The bounds themselves are fine.
    assert getattr(load({name: low}), name) == low
    assert getattr(load({name: high}), name) == high


def test_out_of_range_from_file_and_env(tmp_path: Path) -> None:
    assert "MQTT_BACKUP_PARTITIONS: must be" in config_error(env={"MQTT_BACKUP_PARTITIONS": "0"})
    path = write(tmp_path / "c.toml", "keepalive = 1\n")
    assert f"'keepalive' in {path}: must be" in config_error(config_file=path)


@pytest.mark.parametrize("protocol", ["4", "3", "3.1", "5.0", "mqtt5", ""])
def test_bad_protocol(protocol: str) -> None:
    assert "--protocol: must be 5 or 3.1.1" in config_error({"protocol": protocol})


@pytest.mark.parametrize(
    ("protocol", "version"), [("5", ProtocolVersion.V5), ("3.1.1", ProtocolVersion.V311)]
)
def test_good_protocol(protocol: str, version: ProtocolVersion) -> None:
    assert load({"protocol": protocol}).protocol is version
    assert load(env={"MQTT_BACKUP_PROTOCOL": protocol}).protocol is version
    assert load({"protocol": version}).protocol is version


def test_protocol_as_a_toml_number(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "protocol = 5\n")
    assert load(config_file=path).protocol is ProtocolVersion.V5


@pytest.mark.parametrize("level", ["verbose", "trace", "critical", "", "warn"])
def test_bad_log_level(level: str) -> None:
    assert "--log-level: must be" in config_error({"log_level": level})


@pytest.mark.parametrize(
    ("level", "value"),
    [
        ("debug", LogLevel.DEBUG),
        ("INFO", LogLevel.INFO),
        ("Warning", LogLevel.WARNING),
        ("error", LogLevel.ERROR),
    ],
)
def test_good_log_level(level: str, value: LogLevel) -> None:
    assert load({"log_level": level}).log_level is value


@pytest.mark.parametrize("mode", ["none", "all", "true", "Strict!"])
def test_bad_response_topics(mode: str) -> None:
    message = config_error(env={"MQTT_BACKUP_RESPONSE_TOPICS": mode})
    assert f"MQTT_BACKUP_RESPONSE_TOPICS: must be strict or any, got {mode!r}" in message


@pytest.mark.parametrize(
    ("mode", "value"), [("strict", ResponseTopics.STRICT), ("ANY", ResponseTopics.ANY)]
)
def test_good_response_topics(mode: str, value: ResponseTopics) -> None:
    assert load({"response_topics": mode}).response_topics is value


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://host", "must start with mqtt:// or mqtts://"),
        ("http://host:1883", "must start with mqtt:// or mqtts://"),
        ("host:1883", "must start with mqtt:// or mqtts://"),
        ("127.0.0.1", "must start with mqtt:// or mqtts://"),
        ("", "must start with mqtt:// or mqtts://"),
        ("mqtt://", "has no host"),
        ("mqtt://:1883", "has no host"),
        ("mqtts://user:pw@", "has no host"),
        ("mqtt://host/path", "must not have a path or query"),
        ("mqtt://host:1883/x/y", "must not have a path or query"),
        ("mqtt://host?x=1", "must not have a path or query"),
        ("mqtt://host#frag", "must not have a path or query"),
        ("mqtt://host:port", "broker URL"),
        ("mqtt://host:65536", "broker URL"),
        ("mqtt://host:-1", "broker URL"),
        ("mqtt://[::1", "broker URL"),
    ],
)
def test_bad_broker_urls(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    assert problem in str(info.value)
    assert repr(mask_url(url)) in str(info.value)
    assert "mqtt://host:1883" in info.value.hint
    # The same through load: validated at load time, not first use.
    message = config_error({"broker": url})
    assert "broker URL" in message


@pytest.mark.parametrize(
    ("url", "part", "char", "code", "user", "password"),
    [
        ("mqtt://u:pa/ss@host:1883", "password", "/", "%2F", "u", "pa/ss"),
        ("mqtt://u:pa/ss@host", "password", "/", "%2F", "u", "pa/ss"),
        ("mqtts://u:pa#ss@host:8883", "password", "#", "%23", "u", "pa#ss"),
        ("mqtt://u:pa?ss@host", "password", "?", "%3F", "u", "pa?ss"),
        ("mqtt://u/v:pass@host", "user name", "/", "%2F", "u/v", "pass"),
        ("mqtt://u/v@host", "user name", "/", "%2F", "u/v", None),
    ],
)
def test_an_unescaped_character_in_the_user_part_is_named(
    url: str, part: str, char: str, code: str, user: str, password: str | None
) -> None:
    # Found in use: mqtt://u:pa/ss@host:1883 was "its port must be a number from 1 to 65535".
    with pytest.raises(ConfigError) as info:
        parse_broker_url(url)
    message = info.value.message()
    assert f"its {part} holds a '{char}' that is not percent-encoded" in message
    assert f"'{char}' as {code}" in info.value.hint
    assert "port" not in message
    assert "ss@" not in message, "the password is never shown"
    scheme, rest = url.split("://")
    encoded = parse_broker_url(f"{scheme}://{rest.replace(char, code)}")
    assert (encoded.host, encoded.username, encoded.password) == ("host", user, password)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("mqtt://host", BrokerAddress("host", 1883)),
        ("mqtt://host/", BrokerAddress("host", 1883)),
        ("mqtt://host:1884", BrokerAddress("host", 1884)),
        ("mqtts://host", BrokerAddress("host", 8883, tls=True)),
        ("mqtts://host:443", BrokerAddress("host", 443, tls=True)),
        ("mqtt://10.0.0.7:1883", BrokerAddress("10.0.0.7", 1883)),
        ("mqtt://[::1]:1885", BrokerAddress("::1", 1885)),
        ("mqtt://u@host", BrokerAddress("host", 1883, username="u")),
        ("mqtt://u:@host", BrokerAddress("host", 1883, username="u", password="")),
        ("mqtt://u:p@host:1", BrokerAddress("host", 1, username="u", password="p")),
        (
            "mqtts://us%40er:p%3Aa%2Fs%25s%20w@broker.example:8884",
            BrokerAddress("broker.example", 8884, True, "us@er", "p:a/s%s w"),
        ),
        (
            "mqtt://b%C3%A4r:%F0%9F%99%82@h",
            BrokerAddress("h", 1883, username="bär", password="🙂"),
        ),
    ],
)
def test_parse_broker_url(url: str, address: BrokerAddress) -> None:
    assert parse_broker_url(url) == address


def test_broker_address_str_hides_the_password() -> None:
    address = parse_broker_url("mqtts://alice:s3cr%40t@broker.example")
    assert address.password == "s3cr@t"
    text = str(address)
    assert text == "mqtts://alice@broker.example:8883"
    assert "s3cr" not in text
    assert str(parse_broker_url("mqtt://h")) == "mqtt://h:1883"
    assert str(parse_broker_url("mqtt://:pw@h")) == "mqtt://h:1883"


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("devices/#", "has no '{device}' level"),
        ("dev{device}", "embeds '{device}' in a level"),
        ("{device}/#/x", "misplaced wildcard"),
        ("{site}/{device}", "unknown placeholder"),
        ("$SYS/{device}", "starts with '$'"),
    ],
)
def test_bad_template(topic: str, problem: str) -> None:
    message = config_error({"topic": [topic]})
    assert problem in message
    assert "topic template" in message
    assert "{device}" in message


def test_no_template() -> None:
    assert "at least one topic template" in config_error({"topic": []})
    assert "at least one topic template" in config_error(env={"MQTT_BACKUP_TOPIC": " , "})


@pytest.mark.parametrize(
    ("namespace", "topic"),
    [
        ("backup", "backup/{device}"),
        ("backup", "backup/{device}/#"),
        ("backup", "backup/restore/{device}"),
        ("ops/backup", "ops/backup/{device}/#"),
    ],
)
def test_template_under_the_namespace(namespace: str, topic: str) -> None:
    message = config_error({"namespace": namespace, "topic": [topic]})
    assert "lies under the bridge's namespace" in message
    assert repr(topic) in message


def test_template_beside_the_namespace_is_fine() -> None:
    settings = load({"namespace": "ops/backup", "topic": ["ops/{device}", "backups/{device}"]})
    assert len(settings.templates) == 2


@pytest.mark.parametrize("namespace", ["", "a/+", "a/#", "/a", "a/", "$ns"])
def test_bad_namespace(namespace: str) -> None:
    assert "namespace" in config_error({"namespace": namespace})


def test_empty_client_id() -> None:
    assert "--client-id: must not be empty" in config_error({"client_id": ""})


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "broker = \n")
    message = config_error(config_file=path)
    assert "is not valid TOML" in message
    assert str(path) in message


def test_invalid_default_toml_in_the_cwd() -> None:
    write(Path("mqtt-backup.toml"), "[[[\n")
    assert "mqtt-backup.toml is not valid TOML" in config_error()


def test_unreadable_config_file(tmp_path: Path) -> None:
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'namespace = "b\xe4ckup"\n')
    assert "is not UTF-8 text" in config_error(config_file=not_utf8)
    a_directory = tmp_path / "dir.toml"
    a_directory.mkdir()
    message = config_error(config_file=a_directory)
    assert "cannot read config file" in message
    assert str(a_directory) in message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    message = config_error(config_file=missing)
    assert f"config file {missing} does not exist" in message
    assert "does not exist" in config_error(env={"MQTT_BACKUP_CONFIG": str(missing)})


def test_the_deploy_sample_is_valid_and_documents_every_key() -> None:
    sample = Path(__file__).resolve().parent.parent / "deploy" / "mqtt-backup.toml"
    settings = load(config_file=sample)
    assert settings.broker == "mqtt://127.0.0.1:1883"
    text = sample.read_text(encoding="utf-8")
    missing = [name for name in config.field_names() if name not in text]
    assert missing == [], f"deploy/mqtt-backup.toml does not mention {missing}"


# A password may sit in a URL that does not parse: no error may show it, whatever its source.
BAD_URLS_WITH_A_PASSWORD = [
    "ftp://bridge:hunter2@host",
    "mqtt://bridge:hunter2@host/path",
    "mqtt://bridge:hunter2@host:99999",
    "mqtt://bridge:hunter2@host:port",
    "mqtt://bridge:hunter2@",
    "mqtt://bridge:hunter2@[::1",
    "mqtt://bridge:hunter2@host?x=1",
    "mqtt://bridge:pa/hunter2@host",  # unescaped / in the password
    "mqtt://bridge:pa#hunter2@host",  # unescaped #
    "mqtt://bridge:pa?hunter2@host",  # unescaped ?
    "mqtt://bridge:p@hunter2@host/x",  # unescaped @
    "mqtt://bridge:hunter2",  # the host forgotten
    "bridge:hunter2@host:1883",  # the scheme forgotten
    "bridge:hunter2",
]


@pytest.mark.parametrize("url", BAD_URLS_WITH_A_PASSWORD)
@pytest.mark.parametrize("source", ["flag", "env", "toml"])
def test_a_bad_url_never_shows_its_password(tmp_path: Path, url: str, source: str) -> None:
    match source:
        case "flag":
            message = config_error({"broker": url})
        case "env":
            message = config_error(env={"MQTT_BACKUP_BROKER": url})
        case _:
            toml = write(tmp_path / "c.toml", f"broker = {json.dumps(url)}\n")
            message = config_error(config_file=toml)
    assert "hunter2" not in message
    assert "broker" in message
    assert "***" in message


def test_a_broker_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", 'broker = ["mqtt://bridge:hunter2@host"]\n')
    message = config_error(config_file=toml)
    assert "hunter2" not in message
    assert "'broker'" in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://bridge:s3cret@host:1883", "mqtt://bridge:***@host:1883"),
        ("mqtt://bridge@host", "mqtt://bridge@host"),
        ("mqtt://:s3cret@host", "mqtt://:***@host"),
        ("mqtt://host:1883", "mqtt://host:1883"),
        ("mqtt://[::1]:1883", "mqtt://[::1]:1883"),
        ("mqtt://host/a@b", "mqtt://host/a@b"),
        ("mqtt://host:port", "mqtt://host:***"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
