"""Settings: defaults, then the TOML file, then `MQTT_BACKUP_*` environment, then flags.

Every option has one name used three ways: `--client-id` on the command line,
`MQTT_BACKUP_CLIENT_ID` in the environment (lists comma-separated) and `client_id` (or
`client-id`) in the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mqtt_backup.errors import ConfigError, UsageError
from mqtt_backup.times import parse_duration
from mqtt_backup.topics import Template, check_namespace, parse_template

ENV_PREFIX = "MQTT_BACKUP_"
DEFAULT_CONFIG = Path("mqtt-backup.toml")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is and how to log in."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...`; ConfigError says what is wrong."""
    hint = "a URL such as mqtt://host:1883 (or mqtts://host:8883 for TLS)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {exc}", hint) from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://", hint)
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host", hint)
    if port == 0:
        raise ConfigError(f"broker URL {url!r} has port 0", hint)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r} must not have a path or query", hint)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option of every command, with its default."""

    broker: str = "mqtt://127.0.0.1:1883"
    data: Path = Path("mqtt-backup-data")
    topic: tuple[str, ...] = ("devices/{device}/#",)
    client_id: str | None = None
    partitions: int | None = None
    namespace: str = "backup"
    protocol: str = "5"
    transport: str | None = None  # None: asyncio on MQTT 5, paho on 3.1.1
    metrics_port: int | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30
    batch_max: int = 1000
    batch_ms: int = 20
    log_level: str = "info"
    response_topics: str = "strict"
    prune_older_than: str | None = None
    prune_max_bytes_per_device: int | None = None

    @property
    def broker_address(self) -> BrokerAddress:
        """The parsed broker URL."""
        return parse_broker_url(self.broker)

    @property
    def templates(self) -> list[Template]:
        """The parsed topic templates."""
        return [parse_template(t) for t in self.topic]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be text")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError("must be a whole number")
    try:
        return int(value)
    except ValueError:
        raise TypeError("must be a whole number") from None


def _path(value: Any) -> Path:
    return Path(value if isinstance(value, Path) else _text(value)).expanduser()


def _texts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError("must be a list of text")


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "broker": _text,
    "data": _path,
    "topic": _texts,
    "client_id": _text,
    "partitions": _int,
    "namespace": _text,
    "protocol": lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else _text(v),
    "transport": lambda v: _text(v).lower(),
    "metrics_port": _int,
    "ca": _path,
    "cert": _path,
    "key": _path,
    "session_expiry": _int,
    "keepalive": _int,
    "batch_max": _int,
    "batch_ms": _int,
    "log_level": _text,
    "response_topics": _text,
    "prune_older_than": _text,
    "prune_max_bytes_per_device": _int,
}

_RANGES: dict[str, tuple[int, int]] = {
    "partitions": (1, 1024),
    "metrics_port": (1, 65535),
    "session_expiry": (1, 0xFFFFFFFF),
    "keepalive": (5, 65535),
    "batch_max": (1, 100_000),
    "batch_ms": (1, 10_000),
    "prune_max_bytes_per_device": (1, 2**62),
}


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config_file: Path | None = None,
) -> Settings:
    """Settings from defaults < file < environment < flags (flags given as None are unset).

    Each value is checked where it comes from, so an error names the flag, the variable or the
    file key to fix; checks that span several options run on the merged result.
    """
    values: dict[str, Any] = {}
    path = config_file or _env_config(env)
    if path is not None or DEFAULT_CONFIG.is_file():
        values.update(_from_file(path or DEFAULT_CONFIG))
    values.update(_from_env(env))
    for name, value in flags.items():
        if value is not None:
            values[name] = _parse(name, value, "--" + name.replace("_", "-"))
    settings = Settings(**values)
    _validate_together(settings)
    return settings


def _env_config(env: Mapping[str, str]) -> Path | None:
    text = env.get(ENV_PREFIX + "CONFIG")
    return Path(text) if text else None


def _parse(name: str, value: Any, origin: str) -> Any:
    """Parse and check one value; a ConfigError names its origin (flag, variable or file key)."""
    try:
        parsed = _PARSERS[name](value)
        _check(name, parsed)
    except TypeError as exc:
        raise ConfigError(f"{origin} {exc}, got {value!r}") from None
    except UsageError as exc:
        raise ConfigError(f"{origin}: {exc.detail}", exc.hint) from None
    return parsed


def _check(name: str, value: Any) -> None:
    if name in _RANGES:
        low, high = _RANGES[name]
        if not low <= value <= high:
            raise UsageError(f"must be between {low} and {high}, got {value}")
    if name in _CHOICES and str(value).lower() not in _CHOICES[name]:
        raise UsageError(f"must be {' or '.join(_CHOICES[name])}, got {value!r}")
    match name:
        case "prune_older_than":
            parse_duration(value)
        case "topic" if not value:
            raise UsageError("needs at least one topic template", "devices/{device}/#")
        case "topic":
            for text in value:
                parse_template(text)
        case "namespace":
            check_namespace(value)
        case "broker":
            parse_broker_url(value)
        case "client_id" if not value:
            raise UsageError("must not be empty")
        case "ca" | "cert" | "key" if not value.is_file():
            raise UsageError(f"{value} does not exist or is not a file")


_CHOICES: dict[str, tuple[str, ...]] = {
    "protocol": ("5", "3.1.1"),
    "transport": ("asyncio", "paho"),
    "log_level": ("debug", "info", "warning", "error"),
    "response_topics": ("strict", "any"),
}


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _PARSERS:
            raise ConfigError(
                f"unknown key {key!r} in {path}", f"one of {', '.join(sorted(_PARSERS))}"
            )
        values[name] = _parse(name, value, f"{key!r} in {path}")
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in _PARSERS:
        variable = ENV_PREFIX + name.upper()
        raw = env.get(variable)
        if raw is not None and raw != "":
            values[name] = _parse(name, raw, variable)
    return values


def _validate_together(settings: Settings) -> None:
    own = tuple(settings.namespace.split("/"))
    for template in settings.templates:
        if template.levels[: len(own)] == own:
            raise ConfigError(
                f"topic template {template.text!r} lies under the bridge's namespace {own[0]!r}"
            )
    _validate_tls(settings)
    if settings.transport == "asyncio" and settings.protocol != "5":
        raise ConfigError(
            "--transport asyncio speaks MQTT 5 only", "use --transport paho for MQTT 3.1.1"
        )


def _validate_tls(settings: Settings) -> None:
    if (settings.ca or settings.cert) and not settings.broker_address.tls:
        raise ConfigError("--ca and --cert are for TLS", "use an mqtts:// broker URL")
    if settings.key and not settings.cert:
        raise ConfigError("--key needs --cert (the client certificate it belongs to)")


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields changed (tests and the CLI use it)."""
    return dataclasses.replace(settings, **changes)


def field_names() -> Sequence[str]:
    """Names of all settings, as used in the file (with underscores)."""
    return tuple(_PARSERS)
