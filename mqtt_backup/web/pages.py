"""Each page's data as one JSON document: the JSON twin is exactly what its template renders."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqtt_backup import jsontext
from mqtt_backup.envelope import CSV_COLUMNS, csv_row, message_envelope
from mqtt_backup.errors import UsageError
from mqtt_backup.storage import DeviceInfo, StoreReader
from mqtt_backup.times import format_ts, parse_duration, parse_time
from mqtt_backup.web import history
from mqtt_backup.web.paths import encode_device

NS_PER_S = history.NS_PER_S
DEVICE_SORTS = ("device", "last", "count", "bytes")
DEFAULT_RANGE = "1d"
PAGE_DEVICES = 50
PAGE_MESSAGES = 50
MAX_PAGE = 500
# A payload shown in the table is cut here (the download has it whole).
SHOW_BYTES = 16 * 1024
# `datetime-local` inputs send no seconds and no zone: the page says times are UTC.
_LOCAL = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")


class NotFound(UsageError):
    """{detail}"""


def device_url(device: str) -> str:
    """The device page's path."""
    return f"/devices/{encode_device(device)}"


def device_json(d: DeviceInfo) -> dict[str, Any]:
    """A device as `mqtt-backup devices --json` shows it."""
    return {
        "device": d.device,
        "first": format_ts(d.first_ns),
        "last": format_ts(d.last_ns),
        "count": d.count,
        "bytes": d.size,
        "duplicates": d.dups,
        "partition": d.partition,
    }


def _int_param(params: Mapping[str, str], name: str, default: int, top: int) -> int:
    text = params.get(name)
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise UsageError(f"{name} must be a whole number, not {text!r}")
    return max(0, min(int(text), top))


# ---- devices -----------------------------------------------------------------------------------


def devices_page(reader: StoreReader, params: Mapping[str, str], now_ns: int) -> dict[str, Any]:
    """Devices matching a prefix, sorted, one page of them with sparklines and silence."""
    prefix = params.get("prefix", "")
    sort = params.get("sort") or "device"
    if sort not in DEVICE_SORTS:
        raise UsageError(f"sort must be one of {', '.join(DEVICE_SORTS)}, not {sort!r}")
    offset = _int_param(params, "offset", 0, 2**31)
    limit = _int_param(params, "limit", PAGE_DEVICES, MAX_PAGE) or PAGE_DEVICES
    everything = reader.devices()
    found = [d for d in everything if d.device.startswith(prefix)]
    field = {"last": "last_ns", "bytes": "size"}.get(sort, sort)
    found.sort(key=lambda d: getattr(d, field), reverse=sort != "device")
    # Sparklines cover the last day of the store's history (= now while a bridge runs).
    spark_end = max((d.last_ns for d in everything), default=now_ns) + 1
    shown = found[offset : offset + limit]
    return {
        "prefix": prefix,
        "sort": sort,
        "offset": offset,
        "limit": limit,
        "total": len(found),
        "now": format_ts(now_ns),
        "spark_since": format_ts(max(spark_end - history.SPARK_WINDOW_NS, 0)),
        "spark_until": format_ts(spark_end),
        "devices": [_device_row(reader, d, now_ns, spark_end) for d in shown],
    }


def _device_row(reader: StoreReader, d: DeviceInfo, now_ns: int, spark_end: int) -> dict[str, Any]:
    interval = history.usual_interval_ns(d)
    silent = history.silent_for(d, now_ns)
    return {
        **device_json(d),
        "url": device_url(d.device),
        "usual_interval_s": interval / NS_PER_S if interval is not None else None,
        "silent_for_s": silent / NS_PER_S if silent is not None else None,
        "per_minute": history.sparkline(reader, d.device, spark_end),
    }


# ---- one device --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """The time range a device page shows: [since, until), and how it was asked for."""

    since: int
    until: int
    range: str

    def as_json(self) -> dict[str, Any]:
        """RFC 3339 ends (since inclusive, until exclusive) and the range's name."""
        return {"since": format_ts(self.since), "until": format_ts(self.until), "range": self.range}

    def query(self) -> str:
        """The query string that names this window (for links and downloads)."""
        if self.range == "custom":
            return f"since={self.since / NS_PER_S:.9f}&until={self.until / NS_PER_S:.9f}"
        return f"range={self.range}"


def _web_time(text: str, what: str) -> int:
    text = text.strip()
    if _LOCAL.match(text):
        text += "Z" if text.count(":") == 2 else ":00Z"
    return parse_time(text, what)


def window(d: DeviceInfo, params: Mapping[str, str]) -> Window:
    """The asked window; a range (`1h`, `1d`, `7d`, `all`) ends at the device's last message."""
    end = d.last_ns + 1
    since_text, until_text = params.get("since", ""), params.get("until", "")
    if since_text or until_text:
        until = _web_time(until_text, "until") if until_text else end
        since = _web_time(since_text, "since") if since_text else until - 86400 * NS_PER_S
        if since >= until:
            raise UsageError("since must be before until")
        return Window(max(since, 0), until, "custom")
    name = params.get("range") or DEFAULT_RANGE
    if name == "all":
        return Window(d.first_ns, end, name)
    return Window(max(end - parse_duration(name, "range"), 0), end, name)


def device_page(reader: StoreReader, device: str, params: Mapping[str, str]) -> dict[str, Any]:
    """A device's window: plots (bounded sample), gaps, one page of messages, downloads."""
    d = reader.device(device)
    if d is None:
        raise NotFound(f"no device {device!r} in this store")
    win = window(d, params)
    buckets = _int_param(params, "buckets", history.DEFAULT_BUCKETS, history.MAX_BUCKETS)
    series = history.device_series(reader, device, win.since, win.until, buckets or 1)
    gaps = reader.gaps.overlapping(win.since, win.until)
    url = device_url(device)
    return {
        "device": {**device_json(d), "url": url},
        "window": win.as_json(),
        "series": series.as_json(gaps),
        "messages": messages_page(reader, device, win, params),
        "downloads": {fmt: f"{url}/download.{fmt}?{win.query()}" for fmt in ("jsonl", "csv")},
        "query": win.query(),
    }


def messages_page(
    reader: StoreReader, device: str, win: Window, params: Mapping[str, str]
) -> dict[str, Any]:
    """Newest first, `limit` at a time; `before` (epoch ns, from `next_before`) pages back."""
    limit = _int_param(params, "limit", PAGE_MESSAGES, MAX_PAGE) or PAGE_MESSAGES
    before = _int_param(params, "before", win.until, 2**64)
    until = min(before, win.until)
    got = history.take(reader.messages(device, win.since, until, reverse=True), limit + 1)
    shown = got[:limit]
    return {
        "limit": limit,
        "items": [
            {**message_envelope(m.device, m.ts_ns, m.record), "ts_ns": m.ts_ns} for m in shown
        ],
        "next_before": shown[-1].ts_ns if len(got) > limit else None,
    }


def display(item: Mapping[str, Any]) -> dict[str, Any]:
    """How the table shows one message: pretty JSON, text, or hex with its base64 to copy."""
    if item["encoding"] == "base64":
        raw = base64.b64decode(item["payload"])
        shown = raw[:SHOW_BYTES].hex(" ")
        return {
            "kind": "binary",
            "text": shown,
            "cut": len(raw) > SHOW_BYTES,
            "b64": item["payload"],
        }
    text = item["payload"]
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        kind = "json"
    except ValueError:
        kind = "text"
    return {"kind": kind, "text": text[:SHOW_BYTES], "cut": len(text) > SHOW_BYTES, "b64": None}


def flags(item: Mapping[str, Any]) -> str:
    """QoS and the retain/dup flags, short."""
    marks = [f"q{item['qos']}"] + [name for name in ("retain", "dup") if item[name]]
    return " ".join(marks)


# ---- downloads ---------------------------------------------------------------------------------


def export_chunks(data_dir: Path, device: str, win: Window, fmt: str) -> Iterator[str]:
    """The window as `export --device D --since --until` writes it: JSON lines or CSV.

    It reads with a reader of its own (read-only, as `export` does), so a long download never
    holds up the pages, and closes it when the download ends or is abandoned.
    """
    with StoreReader(data_dir) as reader:
        out = io.StringIO()
        writer = csv.writer(out) if fmt == "csv" else None
        if writer is not None:
            writer.writerow(CSV_COLUMNS)
        for n, m in enumerate(reader.messages(device, win.since, win.until), 1):
            envelope = message_envelope(m.device, m.ts_ns, m.record)
            if writer is not None:
                writer.writerow(csv_row(envelope))
            else:
                out.write(jsontext.dumps(envelope) + "\n")  # export's very lines
            if n % 500 == 0:
                yield _drain(out)
        yield _drain(out)


def _drain(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


# ---- the store ---------------------------------------------------------------------------------


def store_page(reader: StoreReader) -> dict[str, Any]:
    """Partitions with sizes and device counts (from the index), and every recorded gap."""
    found = reader.devices()
    partitions = []
    for spec in reader.manifest.partitions:
        mine = [d for d in found if d.partition == spec.name]
        partitions.append(
            {
                "name": spec.name,
                "path": str(spec.directory(reader.data_dir)),
                "weight": spec.weight,
                "devices": len(mine),
                "messages": sum(d.count for d in mine),
                "bytes": sum(d.size for d in mine),
                "disk_bytes": reader.partitions[spec.name].disk_bytes(),
            }
        )
    return {
        "data_dir": str(reader.data_dir),
        "partitions": partitions,
        "total": {
            key: sum(p[key] for p in partitions)
            for key in ("devices", "messages", "bytes", "disk_bytes")
        },
        "gaps": [g.as_json() for g in reader.gaps.all()],
    }
