"""Device ids in URL paths: tilde-encoding, as datasette does.

A device id may hold `.`, `%`, spaces or `~`. Percent-encoding alone does not survive the trip:
browsers resolve a `..` (or `%2e%2e`) segment before sending it, and servers decode `%2F`
before routing. So every byte outside `A-Z a-z 0-9 _ -` becomes `~XX` (its UTF-8 bytes in hex):
`sensor-01` stays as it is, `hall.temp 2` becomes `hall~2Etemp~202`.
"""

from __future__ import annotations

import re

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPE = re.compile(rb"~([0-9A-Fa-f]{2})")


def encode_device(device: str) -> str:
    """The path segment that names `device` (never empty, never `.` or `..`)."""
    raw = device.encode("utf-8")
    return "".join(chr(b) if b in _SAFE else f"~{b:02X}" for b in raw)


def decode_device(segment: str) -> str | None:
    """The device id a path segment names; None when it is not a valid encoding.

    A segment with no `~` is taken as it is, so a client that only percent-encodes an id
    (which the server has decoded by now) finds it too.
    """
    raw = segment.encode("utf-8")
    if b"~" not in raw:
        return segment or None
    if raw.count(b"~") != len(_ESCAPE.findall(raw)):
        return None
    try:
        return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
