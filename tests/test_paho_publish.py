"""The paho transport decodes plain PUBLISH packets itself (`mqtt.ingest._Client`).

paho's own decoding (an `MQTTMessage`, on MQTT 5 a `Properties` object per packet) was most of
the transport's CPU. The bridge's decoding must store what paho's did, and paho must keep
handing its packets over: the hook is a private method of paho's, pinned here.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from mqtt_backup import config
from mqtt_backup.mqtt.ingest import _Client
from mqtt_backup.records import Properties, Record
from tests.conftest import Broker, Sent, device_client, make_settings, publish, read_all, wait_until
from tests.test_one_loop import RunBridge

PROTOCOLS = {"3.1.1": MQTTProtocolVersion.MQTTv311, "5": MQTTProtocolVersion.MQTTv5}


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_paho_hands_every_publish_to_take_and_decodes_what_it_leaves(
    broker: Broker, unique: str, protocol: str
) -> None:
    """`take` sees each PUBLISH (header, body) first; those it refuses reach on_message."""
    client = _Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{unique}-pin",
        protocol=PROTOCOLS[protocol],
        manual_ack=True,
    )
    offered: list[tuple[int, bytes]] = []
    decoded: list[bytes] = []

    def take(header: int, body: bytearray) -> bool:
        offered.append((header, bytes(body)))
        return len(offered) % 2 == 1  # every other one: paho's way

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        decoded.append(bytes(msg.payload))
        client.ack(msg.mid, msg.qos)

    client.take = take
    client.on_message = on_message
    subscribed: list[int] = []
    client.on_subscribe = lambda _c, _u, mid, _codes, _p: subscribed.append(mid)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.subscribe(f"devices/{unique}/#", qos=1)
        wait_until(lambda: bool(subscribed), 10, "the SUBACK")
        publish(broker, [Sent(f"devices/{unique}/t", f"m{i}".encode()) for i in range(4)])
        wait_until(lambda: len(offered) == 4, 10, "four PUBLISH packets offered to take")
        wait_until(lambda: len(decoded) == 2, 10, "two decoded by paho")
    finally:
        client.disconnect()
        client.loop_stop()
    assert [header >> 4 for header, _ in offered] == [3, 3, 3, 3], "PUBLISH packets only"
    assert [body.endswith(f"m{i}".encode()) for i, (_, body) in enumerate(offered)] == [True] * 4
    assert decoded == [b"m1", b"m3"]


async def _publish_v5(broker: Broker, topic: str) -> None:
    """The cases the bridge decodes and the one it leaves to paho (properties), in order."""
    props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    props.UserProperty = [("k", "v")]
    async with device_client(broker) as client:
        await client.publish(f"{topic}/a", b"plain", qos=1)
        await client.publish(f"{topic}/b", b"", qos=1)
        await client.publish(f"{topic}/c", b"at most once", qos=0)
        await client.publish(f"{topic}/d", b"kept", qos=1, retain=True)
        await client.publish(f"{topic}/\u00fc\u4e2d", b"\x00\xff", qos=1)
        await client.publish(f"{topic}/e", b"with properties", qos=1, properties=props)
        await client.publish(f"{topic}/f", b"after them", qos=1)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_paho_transport_stores_the_records_paho_decoded(
    broker: Broker, data_dir: Path, unique: str, protocol: str, run_bridge: RunBridge
) -> None:
    settings = make_settings(
        broker, data_dir, protocol=protocol, transport=config.Transport("paho")
    )
    bridge = run_bridge(settings)
    topic = f"devices/{unique}"
    asyncio.run(_publish_v5(broker, topic))
    wait_until(lambda: len(read_all(data_dir).get(unique, [])) == 7, 20, "seven stored")
    bridge.stop()
    v5 = protocol == "5"
    props = Properties(content_type="application/json", user=(("k", "v"),)) if v5 else None
    expected = [
        Record(f"{topic}/a", b"plain", 1),
        Record(f"{topic}/b", b"", 1),
        Record(f"{topic}/c", b"at most once", 0),
        Record(f"{topic}/d", b"kept", 1, retain=v5),  # retain-as-published on MQTT 5 only
        Record(f"{topic}/\u00fc\u4e2d", b"\x00\xff", 1),
        Record(f"{topic}/e", b"with properties", 1, properties=props),
        Record(f"{topic}/f", b"after them", 1),
    ]
    assert [m.record for m in read_all(data_dir)[unique]] == expected
    # The retained message stays on the broker for other tests' subscriptions otherwise.
    publish(broker, [Sent(f"{topic}/d", b"", retain=True)])


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_puback_all_acknowledges_a_batch_in_one_write(
    broker: Broker, unique: str, protocol: str
) -> None:
    """The broker takes the PUBACKs of one `puback_all`: none of those comes again."""
    got: list[int] = []
    subscribed: list[int] = []

    def session() -> _Client:
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{unique}-acks",
            protocol=PROTOCOLS[protocol],
            clean_session=False if protocol == "3.1.1" else None,
            manual_ack=True,
        )
        client.on_message = lambda _c, _u, msg: got.append(msg.mid)
        client.on_subscribe = lambda _c, _u, mid, _codes, _p: subscribed.append(mid)
        if protocol == "5":
            props = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 60
            client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        else:
            client.connect("127.0.0.1", broker.port)
        client.loop_start()
        return client

    first = session()
    first.subscribe(f"devices/{unique}/#", qos=1)
    wait_until(lambda: bool(subscribed), 10, "the SUBACK")
    publish(broker, [Sent(f"devices/{unique}/t", f"m{i}".encode()) for i in range(30)])
    wait_until(lambda: len(got) == 30, 10, "thirty messages, none acknowledged")
    first.puback_all(got)
    wait_until(lambda: not first.want_write(), 10, "the PUBACKs written")
    first.disconnect()
    first.loop_stop()
    got.clear()
    second = session()
    publish(broker, [Sent(f"devices/{unique}/t", b"after")])
    wait_until(lambda: len(got) == 1, 10, "the message published after the reconnect")
    second.ack(got[0], 1)
    second.disconnect()
    second.loop_stop()
    assert len(got) == 1, "none of the thirty came again"


def test_puback_all_queues_the_bytes_of_pahos_acks_as_one_packet() -> None:
    """Not connected, paho keeps what is queued: one packet, paho's PUBACKs back to back."""
    mids = [1, 300, 65535, 2]
    ours = _Client(CallbackAPIVersion.VERSION2, manual_ack=True)
    ours.puback_all(mids)
    pahos = paho.Client(CallbackAPIVersion.VERSION2, manual_ack=True)
    for mid in mids:
        pahos.ack(mid, 1)
    assert [p["packet"] for p in ours._out_packet] == [
        b"".join(p["packet"] for p in pahos._out_packet)
    ]


def test_a_buffered_client_reads_many_packets_with_one_recv() -> None:
    """paho reads a packet a piece at a time (type, each length byte, the rest): `buffered`
    serves those pieces from one `recv`, and what is left shows in `unread()`."""
    packets = [b"\x30" + bytes([2 + 1 + len(p)]) + b"\x00\x01t" + p for p in (b"a", b"bb", b"c")]
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    class Counted:
        recvs = 0

        def recv(self, size: int) -> bytes:
            self.recvs += 1
            return ours.recv(size)

    counted = Counted()
    client = _Client(CallbackAPIVersion.VERSION2, manual_ack=True)
    client.buffered = True
    taken: list[bytes] = []

    def take(_header: int, body: bytearray) -> bool:
        taken.append(bytes(body))
        return True

    client.take = take
    client._sock = counted  # type: ignore[assignment]
    try:
        theirs.sendall(b"".join(packets))
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert client.unread()  # two packets wait here, none in the socket
        assert client.loop_read() == client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert not client.unread()
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS  # empty: paho's EAGAIN
    finally:
        client._sock = None
        ours.close()
        theirs.close()
    assert taken == [b"\x00\x01ta", b"\x00\x01tbb", b"\x00\x01tc"]
    assert counted.recvs == 2  # the three packets, then the empty socket
