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
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...`; ConfigError says what is wrong."""
    hint = "--broker mqtt://host:1883 (or mqtts://host:8883 for TLS)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: {exc}", hint) from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://", hint)
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host", hint)
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
    metrics_port: int | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30
    batch_max: int = 1000
    batch_ms: int = 20
    log_level: str = "info"

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
    "protocol": _text,
    "metrics_port": _int,
    "ca": _path,
    "cert": _path,
    "key": _path,
    "session_expiry": _int,
    "keepalive": _int,
    "batch_max": _int,
    "batch_ms": _int,
    "log_level": _text,
}

_RANGES: dict[str, tuple[int, int]] = {
    "partitions": (1, 1024),
    "metrics_port": (1, 65535),
    "session_expiry": (1, 0xFFFFFFFF),
    "keepalive": (5, 65535),
    "batch_max": (1, 100_000),
    "batch_ms": (1, 10_000),
}


def load(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    config_file: Path | None = None,
) -> Settings:
    """Settings from defaults < file < environment < flags (flags given as None are unset)."""
    values: dict[str, Any] = {}
    path = config_file or _env_config(env)
    if path is not None or DEFAULT_CONFIG.is_file():
        values.update(_from_file(path or DEFAULT_CONFIG))
    values.update(_from_env(env))
    values.update({k: _parse(k, v, "flag") for k, v in flags.items() if v is not None})
    settings = Settings(**values)
    _validate(settings)
    return settings


def _env_config(env: Mapping[str, str]) -> Path | None:
    text = env.get(ENV_PREFIX + "CONFIG")
    return Path(text) if text else None


def _parse(name: str, value: Any, origin: str) -> Any:
    try:
        return _PARSERS[name](value)
    except TypeError as exc:
        raise ConfigError(f"{origin} {name!r} {exc}, got {value!r}") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _PARSERS:
            raise ConfigError(
                f"unknown key {key!r} in {path}", f"one of {', '.join(sorted(_PARSERS))}"
            )
        values[name] = _parse(name, value, f"{path}:")
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in _PARSERS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _parse(name, raw, f"environment {ENV_PREFIX}{name.upper()}:")
    return values


def _validate(settings: Settings) -> None:
    for name, (low, high) in _RANGES.items():
        value = getattr(settings, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    if settings.protocol not in ("5", "3.1.1"):
        raise ConfigError(f"protocol must be 5 or 3.1.1, got {settings.protocol!r}")
    if settings.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log_level must be debug, info, warning or error: {settings.log_level!r}"
        )
    if not settings.topic:
        raise ConfigError("at least one topic template is needed", "--topic 'devices/{device}/#'")
    try:
        check_namespace(settings.namespace)
        templates = settings.templates
    except UsageError as exc:
        raise ConfigError(exc.detail, exc.hint) from None
    settings.broker_address  # noqa: B018 - parsing is the validation
    own = tuple(settings.namespace.split("/"))
    for template in templates:
        if template.levels[: len(own)] == own:
            raise ConfigError(f"topic template {template.text!r} lies under the bridge's namespace")
    _validate_tls(settings)
    if settings.client_id is not None and not settings.client_id:
        raise ConfigError("client_id must not be empty")


def _validate_tls(settings: Settings) -> None:
    for name in ("ca", "cert", "key"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{name} file {path} does not exist or is not a file")
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
