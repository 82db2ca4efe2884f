"""An asyncio MQTT connection on aiomqtt, for the restore service and the restore client.

It speaks in plain values (`Delivery`, `records.Properties`) so callers never touch aiomqtt or
paho, and it turns their errors into ours: BrokerUnreachable, BrokerRefused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Self

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_backup.config import BrokerTarget
from mqtt_backup.errors import BrokerRefused, BrokerUnreachable
from mqtt_backup.mqtt.session import CONNECT_TIMEOUT_S, describe, tls_context
from mqtt_backup.mqtt.values import Delivery
from mqtt_backup.records import Properties

log = logging.getLogger(__name__)

DEFAULT_INFLIGHT = 100
# aiomqtt warns at more than 10 publishes awaiting their PUBACK; the restore window keeps up to
# 64 in flight on purpose, so only its errors are worth a line.
_AIOMQTT_LOG = logging.getLogger("mqtt_backup.aiomqtt")
_AIOMQTT_LOG.setLevel(logging.ERROR)


def _to_paho(out: Properties) -> PahoProperties:
    """The PUBLISH properties object of paho."""
    props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if out.correlation_data is not None:
        props.CorrelationData = out.correlation_data
    if out.user:
        props.UserProperty = list(out.user)
    if out.content_type is not None:
        props.ContentType = out.content_type
    if out.payload_format is not None:
        props.PayloadFormatIndicator = out.payload_format
    if out.message_expiry is not None:
        props.MessageExpiryInterval = out.message_expiry
    if out.response_topic is not None:
        props.ResponseTopic = out.response_topic
    return props


def _delivery(message: aiomqtt.Message) -> Delivery:
    props = message.properties
    user = getattr(props, "UserProperty", None) if props is not None else None
    return Delivery(
        topic=message.topic.value,
        payload=bytes(message.payload),
        qos=message.qos,
        retain=bool(message.retain),
        response_topic=getattr(props, "ResponseTopic", None) if props is not None else None,
        correlation_data=getattr(props, "CorrelationData", None) if props is not None else None,
        user=tuple((str(k), str(v)) for k, v in user) if user else (),
    )


class AsyncConnection:
    """`async with AsyncConnection(target, ...) as conn:` one MQTT client on the running loop."""

    def __init__(
        self,
        target: BrokerTarget,
        client_id: str | None = None,
        *,
        keepalive: int = 30,
        max_inflight: int = DEFAULT_INFLIGHT,
    ) -> None:
        self.address = address = target.address
        self.client_id = client_id or f"mqtt-backup-{uuid.uuid4().hex[:12]}"
        self.mqtt5 = target.mqtt5
        self._options: dict[str, Any] = {
            "logger": _AIOMQTT_LOG,
            "username": address.username,
            "password": address.password,
            "identifier": self.client_id,
            "protocol": aiomqtt.ProtocolVersion.V5 if self.mqtt5 else aiomqtt.ProtocolVersion.V311,
            "keepalive": keepalive,
            "timeout": CONNECT_TIMEOUT_S,
            "max_inflight_messages": max_inflight,
            "max_queued_incoming_messages": 10_000,
        }
        if address.tls:
            # Loaded here, as the other connections load them: a file that does not load is bad
            # configuration (exit 2), not an unreachable broker.
            self._options["tls_context"] = tls_context(target.tls_files)
        self._client: aiomqtt.Client | None = None
        self._last_props: tuple[Properties, PahoProperties] | None = None

    async def __aenter__(self) -> Self:
        """Connect; BrokerRefused on a negative CONNACK, BrokerUnreachable otherwise."""
        _quiet_closed_socket_errors(asyncio.get_running_loop())
        client = aiomqtt.Client(self.address.host, self.address.port, **self._options)
        try:
            await _enter(client)
        except MqttConnectError as exc:
            raise BrokerRefused(
                f"{self.address}: {exc}", "check the user name and password"
            ) from exc
        except aiomqtt.MqttError as exc:
            cause = exc.__context__  # aiomqtt raises `from None`: the socket's error is here
            if isinstance(cause, ssl.SSLError):  # the broker's certificate, as the codec says
                raise BrokerUnreachable(f"{self.address}: {describe(cause)}", "check --ca") from exc
            said = describe(cause) if isinstance(cause, OSError) else str(exc)  # no "[Errno 111]"
            raise BrokerUnreachable(
                f"{self.address}: {said}", "check --broker and that the broker runs"
            ) from exc
        self._client = client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Disconnect (quietly when the connection is already gone)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(exc_type, exc, tb)

    def _live(self) -> aiomqtt.Client:
        if self._client is None:
            raise BrokerUnreachable(f"{self.address}: not connected")
        return self._client

    async def subscribe(
        self, filters: Sequence[str], qos: int = 1, *, retain_as_published: bool = False
    ) -> None:
        """Subscribe; BrokerRefused when the broker refuses a filter.

        `retain_as_published` (MQTT 5) keeps the retain flag of live messages, which a broker
        otherwise clears; on MQTT 3.1.1 only messages sent because of the subscription have it.
        """
        client = self._live()
        try:
            if self.mqtt5:
                options = SubscribeOptions(
                    qos=qos,
                    retainAsPublished=retain_as_published,
                    retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE,
                )
                codes = await client.subscribe([(f, options) for f in filters])
            else:
                codes = await client.subscribe([(f, qos) for f in filters])
        except aiomqtt.MqttError as exc:
            raise BrokerUnreachable(f"{self.address}: subscribe failed: {exc}") from exc
        refused = [f for f, rc in zip(filters, codes, strict=False) if _failed(rc)]
        if refused:
            raise BrokerRefused(
                f"subscription to {', '.join(refused)} refused", "check the broker's ACL"
            )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> None:
        """Publish and wait for the broker's PUBACK (QoS 1); BrokerUnreachable when it fails."""
        properties = self._paho_props(props)
        try:
            client = self._live()
            await client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except aiomqtt.MqttError as exc:
            raise BrokerUnreachable(f"{self.address}: publish failed: {exc}") from exc

    def _paho_props(self, props: Properties | None) -> PahoProperties | None:
        # A restore stream sends the same properties with every message: build them once.
        if props is None or not self.mqtt5:
            return None
        if self._last_props is None or self._last_props[0] is not props:
            self._last_props = (props, _to_paho(props))
        return self._last_props[1]

    async def messages(self) -> AsyncIterator[Delivery]:
        """Incoming messages until the connection drops (then BrokerUnreachable)."""
        try:
            async for message in self._live().messages:
                yield _delivery(message)
        except aiomqtt.MqttError as exc:
            raise BrokerUnreachable(f"{self.address}: connection lost: {exc}") from exc


def _quiet_closed_socket_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Make aiomqtt's lost-connection race one warning line instead of an asyncio traceback.

    aiomqtt registers the socket for writing with `call_soon_threadsafe(add_writer, fd, ...)`;
    when the connection drops before that runs, `add_writer` meets a closed descriptor and asyncio
    logs "Exception in callback ..." with two tracebacks. The connection's own error (and the
    reconnect) follows anyway, so one line says what happened. Anything else goes on to the
    handler that was there before.
    """
    previous = loop.get_exception_handler()
    if isinstance(previous, functools.partial) and previous.func is _closed_socket_handler:
        return  # installed by an earlier connection on this loop
    loop.set_exception_handler(functools.partial(_closed_socket_handler, previous))


def _closed_socket_handler(
    previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
    loop: asyncio.AbstractEventLoop,
    context: dict[str, Any],
) -> None:
    exc = context.get("exception")
    message = str(context.get("message", ""))
    closed_fd = (isinstance(exc, OSError) and exc.errno == errno.EBADF) or isinstance(
        exc, ValueError
    )
    if closed_fd and ("add_writer(" in message or "add_reader(" in message):
        log.warning("an MQTT connection closed while it had a write pending (%s)", exc)
    elif previous is not None:
        previous(loop, context)
    else:
        loop.default_exception_handler(context)


def _failed(code: object) -> bool:
    # MQTT 5 gives ReasonCodes, 3.1.1 the granted QoS (128 = failure).
    is_failure = getattr(code, "is_failure", None)
    if isinstance(is_failure, bool):
        return is_failure
    return code == 128


async def _enter(client: aiomqtt.Client) -> None:
    """`client.__aenter__()`; a failed or cancelled one leaves no socket behind.

    aiomqtt leaves a timed-out (or cancelled) handshake's socket open and its reader task
    pending: a socket more per retry against a silent broker, and a traceback at exit. paho's
    own `__del__` closes them, later, when the loop may be gone: here it is done at once.
    """
    try:
        await client.__aenter__()
    except BaseException:
        client._client._reset_sockets()  # paho's own cleanup, see above
        raise
