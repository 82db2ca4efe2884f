"""Settings: defaults, then the TOML file, then `MQTT_BACKUP_*` environment, then flags.

Each setting is declared once, as a field of `Settings`: its type picks the parser, and its
`setting(...)` gives the default, the range or check, and the help. Closed sets are enums. The
other names derive from the field name: `--client-id` on the command line,
`MQTT_BACKUP_CLIENT_ID` in the environment (lists comma-separated) and `client_id` (or
`client-id`) in the file.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

from mqtt_backup.errors import ConfigError, UsageError
from mqtt_backup.times import parse_duration
from mqtt_backup.topics import (
    DEFAULT_GROUP,
    Template,
    check_member_name,
    check_namespace,
    parse_template,
)

ENV_PREFIX = "MQTT_BACKUP_"
DEFAULT_CONFIG = Path("mqtt-backup.toml")
DEFAULT_METRICS_HOST = "127.0.0.1"

log = logging.getLogger(__name__)


class ProtocolVersion(StrEnum):
    """The MQTT version spoken to the broker (not `Protocol`: that name is typing's)."""

    V5 = "5"
    V311 = "3.1.1"


class LogLevel(StrEnum):
    """How much the bridge logs."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(StrEnum):
    """How log lines look: text for people, json (one object per line) for log collectors."""

    TEXT = "text"
    JSON = "json"


class Transport(StrEnum):
    """Which MQTT client feeds ingest: asyncio + the mqtt5 codec (fast, MQTT 5) or paho."""

    ASYNCIO = "asyncio"
    PAHO = "paho"


class ResponseTopics(StrEnum):
    """Which MQTT 5 response topics a restore requester may choose."""

    STRICT = "strict"  # only below its own device's request topic
    ANY = "any"  # any topic that is not a request topic


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


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """CA file for an mqtts:// broker; client certificate and key for mTLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


_NO_TLS_FILES = TlsFiles()


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """A broker to connect to: where and how to log in, the MQTT version, the TLS files.

    What every connection takes (ingest, restore service, restore client, status, simulate); the
    client id, which differs per connection, comes beside it.
    """

    address: BrokerAddress
    protocol: ProtocolVersion = ProtocolVersion.V5
    tls_files: TlsFiles = _NO_TLS_FILES

    @property
    def mqtt5(self) -> bool:
        """Whether the broker is spoken to in MQTT 5."""
        return self.protocol == ProtocolVersion.V5

    def __str__(self) -> str:
        """The broker's URL without the password, for logs."""
        return str(self.address)


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...`; ConfigError says what is wrong.

    The error shows the URL with its password masked (see `mask_url`).
    """
    hint = "a URL such as mqtt://host:1883 (or mqtts://host:8883 for TLS)"
    shown = repr(mask_url(url))
    _check_user_part(url, shown)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # urllib's text may quote the port, which can be a password typed without its host.
        detail = "its port must be a number from 1 to 65535" if "port" in str(exc).lower() else exc
        raise ConfigError(f"broker URL {shown}: {detail}", hint) from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker URL {shown} must start with mqtt:// or mqtts://", hint)
    if not parts.hostname:
        raise ConfigError(f"broker URL {shown} has no host", hint)
    if port == 0:
        raise ConfigError(f"broker URL {shown} has port 0", hint)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {shown} must not have a path or query", hint)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _check_user_part(url: str, shown: str) -> None:
    """ConfigError when the user name or password holds a `/`, `?` or `#` not percent-encoded.

    urllib ends the host part at the first of them, and then reads the rest of the password
    as the port: "its port must be a number" would send the user looking in the wrong place.
    """
    userinfo = url.partition("://")[2].rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    for part, text in (("user name", user), ("password", password)):
        if char := next((c for c in text if c in "/?#"), None):
            code = f"%{ord(char):02X}"
            raise ConfigError(
                f"broker URL {shown}: its {part} holds a '{char}' that is not percent-encoded",
                f"write '{char}' as {code} in the URL"
                + (", or give the password with --password-file" if part == "password" else ""),
            )


def mask_url(url: str) -> str:
    """The URL as it may be shown: whatever could be a password replaced by `***`.

    Works on text that does not parse: the user part runs to the last `@` (a password may hold
    unescaped `/`, `#` or `@`); without one, a `:` part that is not a number may be a password
    whose host was forgotten (`mqtt://user:secret`).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        return f"{scheme}{sep}{user}{':***' if colon else ''}@{host}"
    netloc, tail = _split_netloc(rest)
    name, colon, port = netloc.rpartition(":")
    if colon and "]" not in port and port and not port.isdigit():
        netloc = f"{name}:***"
    return f"{scheme}{sep}{netloc}{tail}"


def _split_netloc(rest: str) -> tuple[str, str]:
    cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    return rest[:cut], rest[cut:]


# ---- parsers (picked by a field's type) and checks (named by its declaration) -------------------


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


def _choice(kind: type[StrEnum]) -> Callable[[Any], StrEnum]:
    """A parser for one enum: any letter case; a TOML number such as `protocol = 5` is its text."""

    def parse(value: Any) -> StrEnum:
        is_number = isinstance(value, int) and not isinstance(value, bool)
        text = str(value) if is_number else _text(value)
        try:
            return kind(text.lower())
        except ValueError:
            raise UsageError(f"must be {' or '.join(kind)}, got {text!r}") from None

    return parse


def _broker(value: str) -> str:
    parse_broker_url(value)
    return value


def _templates(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise UsageError("needs at least one topic template", "devices/{device}/#")
    for text in value:
        parse_template(text)
    return value


def _namespace(value: str) -> str:
    check_namespace(value)
    return value


def _not_empty(value: str) -> str:
    if not value:
        raise UsageError("must not be empty")
    return value


def _member_name(value: str) -> str:
    check_member_name(value)
    return value


def _a_file(value: Path) -> Path:
    if not value.is_file():
        raise UsageError(f"{value} does not exist or is not a file")
    return value


def _duration(value: str) -> str:
    parse_duration(value)
    return value


def split_bind(value: str) -> tuple[str, int | None]:
    """`HOST:PORT`, `HOST`, `[IPv6]:PORT` or `[IPv6]` -> (host, port or None); UsageError."""
    hint = "HOST:PORT such as 0.0.0.0:9464 (IPv6: [::]:9464)"
    host, port = value, ""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"{value!r} is not HOST:PORT", hint)
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host:
        raise UsageError(f"{value!r} has no host", hint)
    if not port:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{value!r}: the port must be a number from 1 to 65535", hint)
    return host, int(port)


def _bind(value: str) -> str:
    split_bind(value)
    return value


def read_password_file(path: Path) -> str:
    """The password in `path`: its first line, without the line break; ConfigError otherwise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the password file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the password file {path} is not UTF-8 text") from None
    if not lines or not lines[0]:
        raise ConfigError(
            f"the password file {path} is empty", "put the password on its first line"
        )
    return lines[0]


# ---- the declarations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """How one setting is parsed, checked and explained; its names derive from its field's name."""

    help: str
    bounds: tuple[int, int] | None = None
    check: Callable[[Any], Any] | None = None  # a further check that returns the value
    default_text: str | None = None  # the default as help shows it; derived when not given
    parse: Callable[[Any], Any] = _text  # derived from the field's type
    choices: tuple[str, ...] = ()  # derived from an enum type
    # A secret: only from the environment, never a flag (`ps` shows flags) or a file key.
    env_only: bool = False

    def validate(self, value: Any) -> Any:
        """The parsed, checked value: TypeError for a wrong type, UsageError for a bad value."""
        parsed = self.parse(value)
        if self.bounds is not None:
            low, high = self.bounds
            if not low <= parsed <= high:
                raise UsageError(f"must be between {low} and {high}, got {parsed}")
        return parsed if self.check is None else self.check(parsed)


_SETTING = "mqtt_backup.config.Setting"  # the key of a field's declaration in its metadata


def setting(
    help: str,  # noqa: A002 (the word every CLI library uses)
    *,
    bounds: tuple[int, int] | None = None,
    check: Callable[[Any], Any] | None = None,
    default_text: str | None = None,
    env_only: bool = False,
) -> dict[str, Setting]:
    """The metadata that declares one field of `Settings`: `field(default=..., metadata=...)`.

    `env_only`: a secret, read from `MQTT_BACKUP_<NAME>` only (no flag, no file key).
    """
    return {_SETTING: Setting(help, bounds, check, default_text, env_only=env_only)}


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of every command, each declared once: type, default, range or check, help."""

    broker: str = field(
        default="mqtt://127.0.0.1:1883",
        metadata=setting("mqtt://[user:pass@]host[:port] or mqtts://...", check=_broker),
    )
    data: Path = field(
        default=Path("mqtt-backup-data"),
        metadata=setting("data directory", default_text="./mqtt-backup-data"),
    )
    topic: tuple[str, ...] = field(
        default=("devices/{device}/#",),
        metadata=setting("topic template with a {device} level; repeatable", check=_templates),
    )
    client_id: str | None = field(
        default=None,
        metadata=setting(
            "MQTT client id",
            check=_not_empty,
            default_text="generated once, kept in the data directory",
        ),
    )
    # The store picks the count of a new data directory; an existing one keeps its own.
    partitions: int | None = field(
        default=None,
        metadata=setting("partitions of a new data directory", bounds=(1, 1024), default_text="1"),
    )
    namespace: str = field(
        default="backup",
        metadata=setting("the bridge's own topics, never stored", check=_namespace),
    )
    group: str | None = field(
        default=None,
        metadata=setting(
            "share ingest with the other bridges of this group ($share/<group>/<filter>)",
            check=_member_name,
        ),
    )
    instance: str | None = field(
        default=None,
        metadata=setting(
            "this bridge's name in its group (status topic, restore answers)",
            check=_member_name,
            default_text="the client id",
        ),
    )
    protocol: ProtocolVersion = field(default=ProtocolVersion.V5, metadata=setting("5 or 3.1.1"))
    transport: Transport | None = field(
        default=None,
        metadata=setting(
            "asyncio or paho: the ingest client",
            default_text="asyncio on MQTT 5, paho on 3.1.1",
        ),
    )
    metrics_port: int | None = field(
        default=None,
        metadata=setting("serve Prometheus metrics on 127.0.0.1:PORT/metrics", bounds=(1, 65535)),
    )
    metrics_bind: str | None = field(
        default=None,
        metadata=setting(
            "serve /metrics and /healthz on HOST:PORT (a HOST alone takes --metrics-port)",
            check=_bind,
            default_text=DEFAULT_METRICS_HOST,
        ),
    )
    password_file: Path | None = field(
        default=None,
        metadata=setting(
            "file whose first line is the broker password (wins over the URL's)", check=_a_file
        ),
    )
    # Never in a repr: a Settings printed in a log or a traceback must not carry it.
    password: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            "the broker password (after --password-file, before the URL's)", env_only=True
        ),
    )
    ca: Path | None = field(
        default=None, metadata=setting("CA certificate for mqtts://", check=_a_file)
    )
    cert: Path | None = field(
        default=None, metadata=setting("client certificate (mTLS)", check=_a_file)
    )
    key: Path | None = field(default=None, metadata=setting("client key (mTLS)", check=_a_file))
    session_expiry: int = field(
        default=7 * 24 * 3600,
        metadata=setting(
            "seconds the broker keeps the session while the bridge is away", bounds=(1, 0xFFFFFFFF)
        ),
    )
    keepalive: int = field(
        default=30, metadata=setting("MQTT keepalive seconds", bounds=(5, 65535))
    )
    batch_max: int = field(
        default=1000,
        metadata=setting(
            "messages a batch closes at (on either transport, what arrives while a commit is "
            "in flight joins the next, up to 10x this held)",
            bounds=(1, 100_000),
        ),
    )
    batch_ms: int = field(
        default=20, metadata=setting("longest a batch waits for more messages", bounds=(1, 10_000))
    )
    log_level: LogLevel = field(
        default=LogLevel.INFO, metadata=setting("debug, info, warning, error")
    )
    max_packet_size: int | None = field(
        default=None,
        metadata=setting(
            "the broker's largest packet in bytes (Mosquitto's max_packet_size): an MQTT 5 "
            "broker announces it, a 3.1.1 one does not; a restore answer larger than that ends "
            "in an error instead of the broker dropping the connection",
            bounds=(128, 268_435_460),
            default_text="as announced by the broker",
        ),
    )
    log_format: LogFormat = field(
        default=LogFormat.TEXT, metadata=setting("text, or json: one JSON object per line")
    )
    response_topics: ResponseTopics = field(
        default=ResponseTopics.STRICT,
        metadata=setting(
            "strict: MQTT 5 response topics must lie under <namespace>/restore/<device>/; "
            "any: allow every topic"
        ),
    )
    prune_older_than: str | None = field(
        default=None,
        metadata=setting("retention: hourly, delete what is older (e.g. 30d)", check=_duration),
    )
    prune_max_bytes_per_device: int | None = field(
        default=None,
        metadata=setting("retention: hourly, keep each device's newest N bytes", bounds=(1, 2**62)),
    )

    @property
    def broker_address(self) -> BrokerAddress:
        """The parsed broker URL, its password replaced by --password-file's or the variable's."""
        address = parse_broker_url(self.broker)
        if self.password_file is not None:
            password: str | None = read_password_file(self.password_file)
        elif self.password is not None:
            password = self.password
        else:
            return address  # a URL's own password, as it always was
        if address.username is None:
            # paho would drop a password without a user name silently.
            raise ConfigError(
                "a broker password needs a user name", "put it in the URL: mqtts://USER@host:8883"
            )
        return dataclasses.replace(address, password=password)

    @property
    def broker_target(self) -> BrokerTarget:
        """The broker as connections take it: address, protocol and TLS files together."""
        files = TlsFiles(*(str(p) if p else None for p in (self.ca, self.cert, self.key)))
        return BrokerTarget(self.broker_address, self.protocol, files)

    @property
    def derived_client_id(self) -> str | None:
        """`mqtt-backup-<group>-<instance>` when both are set and no client id is given."""
        if self.client_id is None and self.group and self.instance:
            return f"mqtt-backup-{self.group}-{self.instance}"
        return None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where /metrics and /healthz are served, or None when they are not."""
        host, port = split_bind(self.metrics_bind or DEFAULT_METRICS_HOST)
        port = port or self.metrics_port
        return None if port is None else (host, port)

    @property
    def templates(self) -> list[Template]:
        """The parsed topic templates."""
        return [parse_template(t) for t in self.topic]


def _complete(declaration: dataclasses.Field[Any], kind: Any) -> Setting:
    """A field's declaration with what its type and default say filled in."""
    if get_origin(kind) is types.UnionType:
        (kind,) = (a for a in get_args(kind) if a is not type(None))
    declared: Setting = declaration.metadata[_SETTING]
    shown = declared.default_text or _shown(declaration.default)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        choices = tuple(kind)
        return dataclasses.replace(
            declared, parse=_choice(kind), choices=choices, default_text=shown
        )
    parse = _texts if get_origin(kind) is tuple else {str: _text, int: _int, Path: _path}[kind]
    return dataclasses.replace(declared, parse=parse, default_text=shown)


def _shown(default: Any) -> str | None:
    if default is None:
        return None
    return ", ".join(default) if isinstance(default, tuple) else str(default)


_TYPES = get_type_hints(Settings)
_DECLARED: dict[str, Setting] = {
    declaration.name: _complete(declaration, _TYPES[declaration.name])
    for declaration in dataclasses.fields(Settings)
}


def declared(name: str) -> Setting:
    """The declaration of one setting (KeyError for an unknown name)."""
    return _DECLARED[name]


def field_names() -> Sequence[str]:
    """Names of all settings, as used in the file (with underscores)."""
    return tuple(_DECLARED)


def flag_name(name: str) -> str:
    """`client_id` -> `--client-id`."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """`client_id` -> `MQTT_BACKUP_CLIENT_ID`."""
    return ENV_PREFIX + name.upper()


def help_for(name: str) -> str:
    """The help of one setting, its default in brackets when it has one."""
    spec = declared(name)
    default = f" [default: {spec.default_text}]" if spec.default_text else ""
    return spec.help + default


# ---- loading ------------------------------------------------------------------------------------


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
            if declared(name).env_only:
                raise ConfigError(f"{name} has no flag", f"set {env_name(name)}")
            values[name] = _parse(name, value, flag_name(name))
    settings = Settings(**values)
    _validate_together(settings)
    _warn_visible_password(flags.get("broker"))
    return settings


_WARNED: set[str] = set()


def _warn_visible_password(broker_flag: Any) -> None:
    """Once per process: a password in a --broker flag shows in `ps` to every local user."""
    if not isinstance(broker_flag, str) or "visible-password" in _WARNED:
        return
    if parse_broker_url(broker_flag).password is not None:
        _WARNED.add("visible-password")
        log.warning(
            "the password in --broker is visible to every user of this machine (ps): "
            "put it in a file readable by this user only and pass --password-file FILE "
            "(or set %s)",
            env_name("password"),
        )


def _env_config(env: Mapping[str, str]) -> Path | None:
    text = env.get(ENV_PREFIX + "CONFIG")
    return Path(text) if text else None


def _parse(name: str, value: Any, origin: str) -> Any:
    """Parse and check one value; a ConfigError names its origin (flag, variable or file key)."""
    try:
        return declared(name).validate(value)
    except TypeError as exc:
        shown = type(value).__name__ if name == "broker" else repr(value)  # may hold a password
        raise ConfigError(f"{origin} {exc}, got {shown}") from None
    except UsageError as exc:
        raise ConfigError(f"{origin}: {exc.detail}", exc.hint) from None


def _from_file(path: Path) -> dict[str, Any]:
    import tomllib  # noqa: PLC0415 - only with a config file (start-up time, design-notes)

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
        if name not in _DECLARED or _DECLARED[name].env_only:
            keys = sorted(n for n, s in _DECLARED.items() if not s.env_only)
            hint = "password_file = PATH" if name == "password" else f"one of {', '.join(keys)}"
            raise ConfigError(f"unknown key {key!r} in {path}", hint)
        values[name] = _parse(name, value, f"{key!r} in {path}")
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in _DECLARED:
        variable = env_name(name)
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
    settings.broker_address  # noqa: B018 - reads the password file: its errors are start-up errors
    _validate_metrics(settings)
    _validate_group(settings)
    if settings.transport == Transport.ASYNCIO and settings.protocol != ProtocolVersion.V5:
        raise ConfigError(
            "--transport asyncio speaks MQTT 5 only", "use --transport paho for MQTT 3.1.1"
        )


def _validate_group(settings: Settings) -> None:
    if settings.group is None:
        return
    if settings.group == DEFAULT_GROUP:
        raise ConfigError(
            f"--group {DEFAULT_GROUP} names the bridges without a group", "choose another name"
        )


def _validate_metrics(settings: Settings) -> None:
    bound = split_bind(settings.metrics_bind)[1] if settings.metrics_bind else None
    if bound and settings.metrics_port and bound != settings.metrics_port:
        raise ConfigError(
            "--metrics-bind and --metrics-port name different ports", "give the port once"
        )
    if settings.metrics_bind and settings.metrics_address is None:
        raise ConfigError(
            f"--metrics-bind {settings.metrics_bind} has no port",
            "HOST:PORT, or add --metrics-port",
        )


def _validate_tls(settings: Settings) -> None:
    if (settings.ca or settings.cert) and not settings.broker_address.tls:
        raise ConfigError("--ca and --cert are for TLS", "use an mqtts:// broker URL")
    if settings.key and not settings.cert:
        raise ConfigError("--key needs --cert (the client certificate it belongs to)")


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields changed, unchecked (tests and the CLI use it)."""
    return dataclasses.replace(settings, **changes)
