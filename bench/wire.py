"""A minimal blocking MQTT 5 client on a raw socket, for load and measurement only.

The bench needs clients that cost as little as possible and whose cost does not depend on the
bridge's own MQTT stack: a publisher of pre-encoded QoS 1 packets that never has more in flight
than the broker's Receive Maximum (the relay ceiling, the preload), and a reader that timestamps
what arrives ($SYS counters, restore answers). Only what the bench uses is encoded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, DISCONNECT = 0x82, 0x90, 0xC0, 0xE0
_PROP_SESSION_EXPIRY, _PROP_RECEIVE_MAXIMUM = 0x11, 0x21
DEFAULT_RECEIVE_MAXIMUM = 65535  # MQTT 5: a CONNACK without the property means this
_U16 = struct.Struct(">H")


class WireError(RuntimeError):
    """The broker refused or closed the connection; the message says what happened."""


def varint(n: int) -> bytes:
    """MQTT variable byte integer."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def connect_packet(client_id: str, clean_start: bool, session_expiry: int, keepalive: int) -> bytes:
    """CONNECT with protocol level 5."""
    props = b""
    if session_expiry:
        props += bytes((_PROP_SESSION_EXPIRY,)) + struct.pack(">I", session_expiry)
    flags = 0x02 if clean_start else 0x00
    head = _utf8("MQTT") + bytes((5, flags)) + _U16.pack(keepalive)
    return _packet(CONNECT, head + varint(len(props)) + props + _utf8(client_id))


def publish_packet(topic: str, payload: bytes, packet_id: int = 0, retain: bool = False) -> bytes:
    """PUBLISH, QoS 1 when packet_id is given, QoS 0 otherwise; no properties."""
    first = PUBLISH | (0x02 if packet_id else 0) | (0x01 if retain else 0)
    ident = _U16.pack(packet_id) if packet_id else b""
    return _packet(first, _utf8(topic) + ident + b"\x00" + payload)


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 1) -> bytes:
    """SUBSCRIBE to one filter (retain handling 0, so retained $SYS values arrive at once)."""
    return _packet(SUBSCRIBE, _U16.pack(packet_id) + b"\x00" + _utf8(topic_filter) + bytes((qos,)))


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet read: its first byte and its body (after the remaining length)."""

    first: int
    body: bytes

    @property
    def kind(self) -> int:
        """The packet type in the high nibble."""
        return self.first & 0xF0


def _read_varint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    for i in range(pos, min(pos + 4, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    return None


def split_packets(buf: bytearray) -> Iterator[Packet]:
    """Yield the complete packets at the start of buf and remove them from it."""
    pos = 0
    while len(buf) - pos >= 2:
        found = _read_varint(buf, pos + 1)
        if found is None:
            break
        length, start = found
        if len(buf) - start < length:
            break
        yield Packet(buf[pos], bytes(buf[start : start + length]))
        pos = start + length
    del buf[:pos]


def publish_parts(pkt: Packet) -> tuple[str, int, bytes]:
    """(topic, packet id or 0, payload) of an MQTT 5 PUBLISH."""
    body = pkt.body
    (tlen,) = _U16.unpack_from(body, 0)
    topic = body[2 : 2 + tlen].decode("utf-8")
    pos = 2 + tlen
    ident = 0
    if pkt.first & 0x06:
        (ident,) = _U16.unpack_from(body, pos)
        pos += 2
    found = _read_varint(body, pos)
    if found is None:
        raise WireError("truncated PUBLISH properties")
    plen, pos = found
    return topic, ident, body[pos + plen :]


def _connack_receive_maximum(body: bytes) -> int:
    found = _read_varint(body, 2)
    if found is None:
        return DEFAULT_RECEIVE_MAXIMUM
    length, pos = found
    end = pos + length
    while pos < end:  # properties: only Receive Maximum matters here; skip the others by type
        ident = body[pos]
        pos += 1
        if ident == _PROP_RECEIVE_MAXIMUM:
            return int(_U16.unpack_from(body, pos)[0])
        pos = _skip_property(body, ident, pos)
    return DEFAULT_RECEIVE_MAXIMUM


def _skip_property(body: bytes, ident: int, pos: int) -> int:
    fixed = {0x01: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1, 0x13: 2, 0x21: 2, 0x22: 2}
    if ident in fixed:
        return pos + fixed[ident]
    if ident in (0x02, 0x11, 0x18, 0x27):
        return pos + 4
    if ident == 0x0B:
        found = _read_varint(body, pos)
        return found[1] if found else len(body)
    if ident == 0x26:  # user property: two strings
        pos += 2 + int(_U16.unpack_from(body, pos)[0])
    return pos + 2 + int(_U16.unpack_from(body, pos)[0])


class Client:
    """One blocking MQTT 5 connection."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.receive_maximum = DEFAULT_RECEIVE_MAXIMUM
        self.session_present = False
        self._next_id = 0

    def connect(
        self, client_id: str, clean_start: bool = True, session_expiry: int = 0, keepalive: int = 0
    ) -> Client:
        """CONNECT and wait for CONNACK; WireError when refused."""
        self.sock.sendall(connect_packet(client_id, clean_start, session_expiry, keepalive))
        ack = self.expect(CONNACK)
        if ack.body[1] != 0:
            raise WireError(f"CONNACK reason {ack.body[1]:#x} for {client_id}")
        self.session_present = bool(ack.body[0] & 0x01)
        self.receive_maximum = _connack_receive_maximum(ack.body)
        return self

    def packet_id(self) -> int:
        """The next packet identifier, 1..65535."""
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """SUBSCRIBE and wait for SUBACK (packets that arrive first are kept for read())."""
        self.sock.sendall(subscribe_packet(self.packet_id(), topic_filter, qos))
        ack = self.expect(SUBACK)
        if ack.body[-1] >= 0x80:
            raise WireError(f"SUBACK reason {ack.body[-1]:#x} for {topic_filter}")

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        if not data:
            raise WireError("the broker closed the connection")
        self.buf += data
        return True

    def read(self) -> list[Packet]:
        """The packets that one recv() completes (possibly none)."""
        self._fill()
        return list(split_packets(self.buf))

    def expect(self, kind: int) -> Packet:
        """Read until a packet of this kind arrives; others before it are dropped."""
        while True:
            for pkt in split_packets(self.buf):
                if pkt.kind == kind:
                    return pkt
            self._fill()

    def publish_window(
        self,
        packets: Iterable[bytes],
        window: int,
        on_ack: Callable[[int], None] | None = None,
    ) -> int:
        """Send pre-encoded QoS 1 PUBLISH packets, never more than `window` unacknowledged.

        Returns how many were sent; on_ack(total acked so far) after each read.
        """
        source = iter(packets)
        sent = acked = 0
        done = False
        while not done or acked < sent:
            chunk: list[bytes] = []
            while not done and sent + len(chunk) - acked < window:
                nxt = next(source, None)
                if nxt is None:
                    done = True
                else:
                    chunk.append(nxt)
            if chunk:
                self.sock.sendall(b"".join(chunk))
                sent += len(chunk)
            if acked < sent:
                acked += sum(1 for p in self.read() if p.kind == PUBACK)
                if on_ack is not None:
                    on_ack(acked)
        return sent

    def disconnect(self) -> None:
        """DISCONNECT (normal) and close; the session stays when it has an expiry."""
        with contextlib.suppress(OSError):
            self.sock.sendall(bytes((DISCONNECT, 0)))
        self.sock.close()


def qos1_packets(messages: Iterable[tuple[str, bytes]]) -> Iterator[bytes]:
    """Pre-encoded QoS 1 PUBLISH packets with identifiers 1..65535 in turn.

    The window stays far below 65535, so an identifier is free again long before it recurs.
    """
    ident = 0
    for topic, payload in messages:
        ident = ident % 65535 + 1
        yield publish_packet(topic, payload, ident)


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise WireError(f"nothing listens on port {port}")
        time.sleep(0.02)
