"""Key layout (an on-disk contract, pinned by golden vectors).

    device_key (16) | timestamp_ns (8, big-endian) | sequence (4, big-endian, wraps)

Key order is per-device time order, so "device X between t1 and t2" is a seek and a short scan.
"""

from __future__ import annotations

import struct

import mmh3

DEVICE_KEY_LEN = 16
KEY_LEN = 28
SEQ_MASK = 0xFFFFFFFF
_TAIL = struct.Struct(">QI")
_TS = struct.Struct(">Q")
# What follows the device key in a record key, for the write path's inlined record_key: ts_ns, seq.
key_tail = _TAIL.pack
# Greater than every 28-byte key of a device: the exclusive upper bound of its whole range.
_PAST_LAST = b"\xff" * (KEY_LEN - DEVICE_KEY_LEN + 1)


def device_key(device_id: str) -> bytes:
    """MurmurHash3 x64 128-bit (seed 0) of the UTF-8 device id, 16 bytes as mmh3 returns them."""
    return mmh3.hash_bytes(device_id.encode("utf-8"))


def record_key(dev_key: bytes, ts_ns: int, seq: int) -> bytes:
    """The 28-byte key of one stored message."""
    return dev_key + _TAIL.pack(ts_ns, seq & SEQ_MASK)


def split_key(key: bytes) -> tuple[bytes, int, int]:
    """(device key, timestamp ns, sequence) of a stored key."""
    ts_ns, seq = _TAIL.unpack_from(key, DEVICE_KEY_LEN)
    return key[:DEVICE_KEY_LEN], ts_ns, seq


def device_range(
    dev_key: bytes, since_ns: int | None = None, until_ns: int | None = None
) -> tuple[bytes, bytes]:
    """[lower, upper) key bounds of one device's messages received in [since, until)."""
    lower = dev_key + _TS.pack(since_ns or 0)
    upper = dev_key + (_TS.pack(until_ns) if until_ns is not None else _PAST_LAST)
    return lower, upper
