"""A recording MQTT peer for tests that pin bytes on the wire (what a real broker hides).

It answers just enough (CONNACK, SUBACK granting QoS 1, PUBACK, PINGRESP) for a client to
connect, subscribe and publish, and keeps every packet each client sent, as bytes, in order.
Behaviour is tested against the real Mosquitto elsewhere; this only shows what was sent.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

CONNECT, PUBLISH, SUBSCRIBE, PINGREQ, DISCONNECT = 1, 3, 8, 12, 14


@dataclass
class Peer:
    """One client connection: its client id and its packets (type, whole packet bytes)."""

    client_id: str = ""
    v5: bool = True
    packets: list[tuple[int, bytes]] = field(default_factory=list)
    sock: socket.socket | None = None

    def take_over(self) -> None:
        """What EMQX or HiveMQ send when a new connection takes the session: reason 0x8E."""
        assert self.sock is not None
        self.sock.sendall(b"\xe0\x02\x8e\x00")

    def of_type(self, kind: int) -> list[bytes]:
        """The packets of one type, in the order sent."""
        return [raw for k, raw in self.packets if k == kind]


class WireBroker:
    """Listens on 127.0.0.1:<port>; `peers` grows by one per connection."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.peers: list[Peer] = []
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        """The --broker value."""
        return f"mqtt://127.0.0.1:{self.port}"

    def peer(self, client_id: str) -> Peer:
        """The last connection of a client id (KeyError when it never connected)."""
        with self._lock:
            for peer in reversed(self.peers):
                if peer.client_id == client_id:
                    return peer
        raise KeyError(client_id)

    def close(self) -> None:
        """Stop listening."""
        self._closing = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            peer = Peer(sock=conn)
            with self._lock:
                self.peers.append(peer)
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while (packet := _split(buffer)) is not None:
                    raw, buffer = packet
                    kind = raw[0] >> 4
                    peer.packets.append((kind, raw))
                    answer = self._answer(kind, raw, peer)
                    if answer is None:
                        return
                    try:
                        conn.sendall(answer)
                    except OSError:  # the client went first (an abort at its end)
                        return

    @staticmethod
    def _answer(kind: int, raw: bytes, peer: Peer) -> bytes | None:  # noqa: PLR0911 - per type
        body = raw[_header_size(raw) :]
        match kind:
            case 1:  # CONNECT: protocol name, level, flags, keepalive, [props], client id
                name_len = int.from_bytes(body[0:2], "big")
                at = 2 + name_len
                peer.v5 = body[at] == 5
                at += 4
                if peer.v5:
                    props, size = _varint(body, at)
                    at += size + props
                id_len = int.from_bytes(body[at : at + 2], "big")
                peer.client_id = body[at + 2 : at + 2 + id_len].decode()
                return b"\x20\x03\x00\x00\x00" if peer.v5 else b"\x20\x02\x00\x00"
            case 8:  # SUBSCRIBE: one QoS 1 grant per filter
                count = _filter_count(body, peer.v5)
                rest = body[:2] + (b"\x00" if peer.v5 else b"") + b"\x01" * count
                return bytes([0x90, len(rest)]) + rest
            case 10:  # UNSUBSCRIBE
                rest = body[:2] + (b"\x00" + b"\x00" if peer.v5 else b"")
                return bytes([0xB0, len(rest)]) + rest
            case 3 if raw[0] & 0x06:  # PUBLISH at QoS 1: PUBACK its packet id
                topic_len = int.from_bytes(body[0:2], "big")
                return b"\x40\x02" + body[2 + topic_len : 4 + topic_len]
            case 12:
                return b"\xd0\x00"
            case 14:
                return None
            case _:
                return b""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift, size = 0, 0, 0
    while True:
        byte = data[at + size]
        value |= (byte & 0x7F) << shift
        size += 1
        if not byte & 0x80:
            return value, size
        shift += 7


def _header_size(raw: bytes) -> int:
    return 1 + _varint(raw, 1)[1]


def _split(buffer: bytes) -> tuple[bytes, bytes] | None:
    if len(buffer) < 2:
        return None
    try:
        length, size = _varint(buffer, 1)
    except IndexError:
        return None
    end = 1 + size + length
    return (buffer[:end], buffer[end:]) if len(buffer) >= end else None


def _filter_count(body: bytes, v5: bool) -> int:
    at = 2
    if v5:
        props, size = _varint(body, at)
        at += size + props
    count = 0
    while at < len(body):
        at += 2 + int.from_bytes(body[at : at + 2], "big") + 1
        count += 1
    return count
