"""The outputs of a run: a rich table on the terminal, a JSON file, and docs/benchmarks.md.

docs/benchmarks.md is generated from the JSON files only (`python -m bench docs`), never typed:
the default run's section, then the BENCH_SCALE run's section when that file exists.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

SCHEMA = 1


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if unit.startswith("ms ") or abs(value) < 10:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def _ratio(row: dict[str, Any]) -> str:
    ratio = row.get("ratio")
    return "" if ratio is None else f"{ratio:.2f}"


def _extras(row: dict[str, Any]) -> str:
    d = row["details"]
    parts = []
    if "error" in d:
        parts.append(f"FAILED: {d['error']}")
    if "cpu_s_per_100k" in d:
        parts.append(f"CPU/100k {d['cpu_s_per_100k']:.2f} s")
    if "broker_cpu_s_per_100k" in d:
        parts.append(f"broker CPU/100k {d['broker_cpu_s_per_100k']:.2f} s")
    ref = d.get("reference")
    if isinstance(ref, dict) and "cpu_s_per_100k" in ref:
        parts.append(f"ref CPU/100k {ref['cpu_s_per_100k']:.2f} s")
    if d.get("peak_rss_bytes"):
        parts.append(f"peak RSS {d['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "p99_ms" in d and row["unit"] != "ms p99 publish-to-stored":
        parts.append(f"p99 {d['p99_ms']:.1f} ms")
    parts += _web_extras(d)
    if "broker_round_trip" in d:
        parts.append(f"broker round trip p50 {d['broker_round_trip']['p50_ms']:.2f} ms")
    if "max_lag_messages" in d:
        parts.append(
            f"stored {d['stored_msg_per_s']:,.0f} msg/s, p50 {d['p50_ms']:.1f} ms, "
            f"max lag {d['max_lag_messages']}, RSS {d['rss_first_tenth_bytes'] / 2**20:.0f}"
            f"->{d['rss_last_tenth_bytes'] / 2**20:.0f} MiB"
        )
    if "cold_start_s" in d:
        parts.append(
            f"cold start {d['cold_start_s']:.2f} s; each "
            + ", ".join(f"{s:.2f}" for s in d["each_s"])
        )
    if "moved_bytes" in d:
        parts.append(f"{d['moved_bytes'] / 1e6:.1f} MB in {d['seconds']:.1f} s")
    if d.get("method") == "bounds":
        parts.append("coarse (drain < 2 s)")
    return "; ".join(parts)


def _web_extras(d: dict[str, Any]) -> list[str]:
    """The web scenario's: server CPU per request; its reference's p99, or export's start-up."""
    parts = []
    ref = d.get("reference")
    if "cpu_ms_per_request" in d:
        parts.append(f"server CPU {d['cpu_ms_per_request']:.0f} ms/request")
    if isinstance(ref, dict) and "records_read" in ref:
        parts.append(f"records read {d.get('records_read')}, ref {ref['records_read']}")
    if isinstance(ref, dict) and "cpu_ms_per_request" in ref:
        parts.append(
            f"ref p99 {ref['p99_ms']:.1f} ms, ref server CPU {ref['cpu_ms_per_request']:.0f} ms"
        )
    if isinstance(ref, dict) and "start_up_s" in ref:
        parts.append(f"export {ref['seconds']:.2f} s, of which start-up {ref['start_up_s']:.2f} s")
    return parts


COLUMNS = ("scenario", "case", "subject", "value", "unit", "reference", "ratio", "goal", "details")


def cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one row."""
    ref = row["reference"]
    ref_text = f"{_num(ref, row['unit'])} ({row['reference_subject']})" if ref is not None else ""
    return [
        row["scenario"],
        row["case"],
        row["subject"],
        _num(row["value"], row["unit"]),
        row["unit"],
        ref_text,
        _ratio(row),
        row["goal"],
        _extras(row),
    ]


def print_table(doc: dict[str, Any], console: Console) -> None:
    """The run's rows as a rich table."""
    table = Table(*COLUMNS, title=f"mqtt-backup bench ({doc['mode']})", show_lines=False)
    for row in doc["rows"]:
        table.add_row(*cells(row))
    console.print(table)


def write_json(doc: dict[str, Any], path: Path) -> None:
    """The run as one JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_md_escape(c) for c in cells(r)) + " |" for r in rows]
    return out


def _command(text: str) -> str:
    """The bridge command without this machine's interpreter path."""
    words = shlex.split(text)
    if words and Path(words[0]).name.startswith("python"):
        words[0] = "python"
    return shlex.join(words)


def _md_machine(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    load = doc["load_before"], doc["load_after"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        f"- run: {doc['started']} ({doc['mode']}, {doc['seconds']:.0f} s), "
        f"commit {doc.get('commit') or 'not recorded'}, "
        f"bridge command `{_command(doc['bridge_command'])}`, variants: "
        + ", ".join(
            f"`{v['name']}` (`run {v['run_args']}`)".replace("(`run `)", "(`run`)")
            for v in doc["variants"]
        ),
        (
            f"- machine: {m['cores']} cores, {m['memory_bytes'] / 2**30:.1f} GiB, "
            f"{m['cpu_model']}; "
            f"{m['os']} (kernel {m['kernel']})"
        ),
        f"- Mosquitto {m['mosquitto']}, Python {m['python']}; {packages}",
        f"- load average before / after: {load[0][0]:.2f} / {load[1][0]:.2f}",
        "- sizes: " + ", ".join(f"{k} {v}" for k, v in doc["sizes"].items()),
    ]
    if doc.get("loaded"):
        lines.append(
            "- **This run shared the machine with other work (load above the core count): "
            "its ratios are indicative only; rerun on a quiet machine.**"
        )
    return lines


HEADER = """# Benchmarks

Generated by `make bench` from {sources} (`python -m bench docs` rewrites this page from the JSON;
do not edit it by hand). Every figure is measured beside its reference in the same run on the
same broker, and the ratio is the figure that counts: absolute rates move with the machine.

- ingest: the same preloaded queue (QoS 1, a persistent session filled while the consumer was
  away) drained by `mosquitto_sub -c -q 1` and by the bridge into durable storage, each on a
  fresh broker of the same config (since 2026-11-30; before, the bridge drained second on the
  reference's broker), read from the broker's side (`$SYS/broker/store/messages/count` every
  second, a line fitted through the samples inside the drain). CPU seconds per 100k messages
  from /proc/<pid>/stat over the drain.
- live ingest: a publisher at a fixed offered rate; publish-to-stored times from the bridge's
  stored count (metrics endpoint, read every 10 ms) against the publisher's send times.
- restore: one device's messages to `mosquitto_sub -q 1`, vs the relay ceiling: a pre-encoded
  QoS 1 publisher, never more in flight than the broker's Receive Maximum, pushing as many
  messages of the same sizes through the same broker to the same kind of subscriber. First
  message: request to the first answer, each restore awaited to its end.
- storage: bytes of table files and WALs after reopening (the WAL recovered into compressed
  tables) per message, against topic + payload bytes.
- devices: the ingest drain at growing numbers of distinct devices (ratio: against the smallest).
- operations: `partitions add` on a prefilled store (bytes moved / wall time); `kill -9` of a
  bridge under a steady offered load, restarted at once, until its stored count moves again.
- web: `mqtt-backup web` in its own process on a prefilled store (JSON telemetry, one message a
  second per device), pages asked for over one keep-alive connection, request to last byte, p50
  and p99 over a fixed number of requests and the server's CPU per request. The devices page at
  1k devices; a big device's page (100k messages, 1M with BENCH_SCALE; default window and
  everything, HTML and JSON) against the same page of a 10k-message device, sparser but never
  below one message in ten seconds (so that its day, too, holds more than the 8,192 records a
  page reads at most: a window below that is read whole, and cheaper), asked for in turns
  (ratio: bounded work per page; both pages' records read are in the JSON). The JSONL
  download of 10k messages against `mqtt-backup export` of the same window, net of an export
  of an empty window (start-up and opening the store).

Brokers: "stock Mosquitto" is Mosquitto's defaults (inflight window 20) with only
`max_queued_messages` raised to hold the preload and `sys_interval 1`; "mosquitto/dev.conf" is the
project's broker config (inflight window 1000) plus `sys_interval 1`.
"""


def markdown(default: dict[str, Any] | None, scale: dict[str, Any] | None) -> str:
    """The whole docs/benchmarks.md."""
    sources = [
        f"`{name}`"
        for name, doc in (("docs/benchmarks.json", default), ("docs/benchmarks-scale.json", scale))
        if doc is not None
    ]
    lines = [HEADER.format(sources=" and ".join(sources) or "its JSON files")]
    for title, doc in (("Default run", default), ("BENCH_SCALE run", scale)):
        lines.append(f"## {title}\n")
        if doc is None:
            lines.append("Not run yet: `BENCH_SCALE=1 make bench` writes it.\n")
            continue
        lines += _md_machine(doc)
        lines.append("")
        lines += _md_table(doc["rows"])
        lines.append("")
    return "\n".join(lines)


def write_markdown(docs_dir: Path) -> Path:
    """Regenerate docs/benchmarks.md from the JSON files beside it."""
    found: list[dict[str, Any] | None] = []
    for name in ("benchmarks.json", "benchmarks-scale.json"):
        path = docs_dir / name
        found.append(json.loads(path.read_text(encoding="utf-8")) if path.exists() else None)
    out = docs_dir / "benchmarks.md"
    out.write_text(markdown(found[0], found[1]), encoding="utf-8")
    return out
