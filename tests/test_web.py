"""The web view through Starlette's test client, on real RocksDB stores made by the Store."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mqtt_backup import records
from mqtt_backup.errors import EXIT_STORAGE, EXIT_USAGE, StorageError, UsageError
from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store, StoreReader, ballast, store
from mqtt_backup.web import create_app, history, pages, run_web
from mqtt_backup.web.auth import COOKIE
from mqtt_backup.web.paths import decode_device, encode_device
from mqtt_backup.web.serve import listen, load_token, parse_bind
from tests.conftest import wait_until
from tests.webstore import (
    BASE_NS,
    ODD_IDS,
    SCRIPT,
    S,
    exported,
    fleet_store,
    telemetry,
    write,
)
from tools import devbroker

# "Now" for the pages: where the sensors end, 100 minutes after BASE_NS.
NOW_NS = BASE_NS + 6000 * S
JSON = {"accept": "application/json"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One store for the module: the tests that use it only read (the app never writes)."""
    data = tmp_path_factory.mktemp("fleet") / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ballast, "MAX_BYTES", 1024 * 1024)  # as clean_env does for each test
        fleet_store(data)
    before = sorted(p.relative_to(data) for p in data.rglob("*") if "partitions" not in p.parts)
    yield data
    after = sorted(p.relative_to(data) for p in data.rglob("*") if "partitions" not in p.parts)
    assert after == before, "a test changed the shared fleet: give it its own store"


@pytest.fixture
def client(fleet: Path) -> Iterator[TestClient]:
    with TestClient(create_app(fleet, clock=lambda: NOW_NS)) as c:
        yield c


def get_json(client: TestClient, url: str, **headers: str) -> Any:
    response = client.get(url, headers={**JSON, **headers})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


# ---- JSON twins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "/devices/sensor-01", "/store"])
def test_every_page_has_a_json_twin_by_accept_or_format(client: TestClient, url: str) -> None:
    by_accept = get_json(client, url)
    by_query = client.get(url + "?format=json").json()
    assert by_accept == by_query
    page = client.get(url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")


def test_devices_lists_the_store_like_the_devices_command(client: TestClient) -> None:
    data = get_json(client, "/?limit=100")
    names = [d["device"] for d in data["devices"]]
    assert names == sorted(["sensor-01", "quiet-02", "xss<b>", "bin-1", *ODD_IDS])
    sensor = next(d for d in data["devices"] if d["device"] == "sensor-01")
    assert sensor["count"] == 600
    assert sensor["first"] == "2026-01-01T00:00:00.000000000Z"
    assert sensor["usual_interval_s"] == 10.0
    assert len(sensor["per_minute"]) == history.SPARK_BUCKETS
    # The last hour of the day holds the sensor's 100 minutes: 6 a minute.
    assert sensor["per_minute"][-1] == pytest.approx(6.0, rel=0.05)


def test_devices_search_by_prefix_and_sort(client: TestClient) -> None:
    assert [d["device"] for d in get_json(client, "/?prefix=sens")["devices"]] == ["sensor-01"]
    by_count = get_json(client, "/?sort=count")["devices"]
    assert [d["device"] for d in by_count[:2]] == ["sensor-01", "quiet-02"]
    by_last = get_json(client, "/?sort=last")["devices"]
    lasts = [d["last"] for d in by_last]
    assert lasts == sorted(lasts, reverse=True)
    page = get_json(client, "/?limit=2&offset=2")
    assert page["total"] == len(get_json(client, "/?limit=100")["devices"])
    assert len(page["devices"]) == 2
    assert client.get("/?sort=nonsense", headers=JSON).status_code == 400


def test_a_device_silent_past_its_usual_interval_stands_out(client: TestClient) -> None:
    rows = {d["device"]: d for d in get_json(client, "/?limit=100")["devices"]}
    assert rows["quiet-02"]["silent_for_s"] == pytest.approx(6000 - 590)
    assert rows["sensor-01"]["silent_for_s"] is None
    page = client.get("/?prefix=quiet").text
    assert '<tr class="silent">' in page
    assert "silent 1.5 h" in page


# ---- a device's plots -------------------------------------------------------------------------


def test_device_page_plots_every_numeric_field_by_path(client: TestClient) -> None:
    series = get_json(client, "/devices/sensor-01?range=all&buckets=10")["series"]
    assert set(series["fields"]) == {"temp_c", "battery", "env.hum", "cells.0", "cells.1"}
    assert len(series["t"]) == 10
    # 600 messages over 10 buckets, read whole (the sample is not capped at this size).
    assert all(series["exact"])
    assert sum(series["per_minute"]) * series["bucket_seconds"] / 60 == pytest.approx(600)
    temp = series["fields"]["temp_c"]
    assert temp["min"][0] == 20
    assert temp["max"][0] == 26
    first_bucket = [20 + i % 7 for i in range(60)]
    assert temp["mean"][0] == pytest.approx(sum(first_bucket) / 60)


def test_bare_number_payloads_are_plotted_by_topic(data_dir: Path) -> None:
    opened = Store.open(data_dir, 1)
    try:
        write(opened, "t1", [(BASE_NS + i * S, b"21.5") for i in range(5)], topic="tele/t1/temp")
    finally:
        opened.close()
    with TestClient(create_app(data_dir)) as c:
        fields = get_json(c, "/devices/t1?range=all")["series"]["fields"]
    assert fields["tele/t1/temp"]["max"][0] == 21.5


def test_plot_work_is_bounded_whatever_the_device_size(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spy counting decoded records (it changes nothing): work must not grow with the device.
    decoded = [0]
    real_decode = records.decode_record

    def counting(value: bytes) -> Any:
        decoded[0] += 1
        return real_decode(value)

    monkeypatch.setattr(store, "decode_record", counting)
    monkeypatch.setattr(history, "READ_BUDGET", 800)
    opened = Store.open(data_dir, 2)
    try:
        for chunk in range(4):  # 20,000 messages, 5 ms apart, in one 100 s window
            base = BASE_NS + chunk * 5000 * 5_000_000
            write(opened, "big", [(base + i * 5_000_000, telemetry(i)) for i in range(5000)])
        write(opened, "small", [(BASE_NS + i * 5_000_000, telemetry(i)) for i in range(200)])
    finally:
        opened.close()
    with TestClient(create_app(data_dir)) as c:
        reads = {}
        for device in ("big", "small"):
            decoded[0] = 0
            series = get_json(c, f"/devices/{device}?range=all&limit=10&buckets=20")["series"]
            reads[device] = decoded[0]
            assert series["records_read"] <= 800
        big = get_json(c, "/devices/big?range=all&buckets=20")["series"]
    # The table's 11 look-ups come on top of the plots' sample.
    assert reads["big"] <= 800 + 11
    assert reads["small"] <= 200 + 11
    estimated = sum(big["per_minute"]) * big["bucket_seconds"] / 60
    assert not all(big["exact"])
    assert estimated == pytest.approx(20_000, rel=0.05)


class _CountingIter:
    """A RocksDB iterator that counts its seeks and steps (it changes nothing)."""

    def __init__(self, it: Any, counts: dict[str, int]) -> None:
        self._it = it
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._it, name)
        if name in ("seek", "seek_to_first", "seek_to_last", "seek_for_prev", "next", "prev"):
            kind = "steps" if name in ("next", "prev") else "seeks"

            def counted(*args: Any) -> Any:
                self._counts[kind] += 1
                return found(*args)

            return counted
        return found


class _CountingDb:
    """A partition's database whose iterators count (everything else passes through)."""

    def __init__(self, db: Any, counts: dict[str, int]) -> None:
        self._db = db
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def iter(self, *args: Any) -> _CountingIter:
        return _CountingIter(self._db.iter(*args), self._counts)


def test_default_window_work_is_the_same_for_a_device_ten_times_bigger(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default window (1d) of two devices alike in their last day, one with ten times the
    # history before it: the page must seek and step through RocksDB exactly as often for both.
    monkeypatch.setattr(history, "READ_BUDGET", 400)
    minute = 60 * S
    end = BASE_NS + 250 * 3600 * S
    # One batch per partition in time order: a partition's clock never goes back.
    items = sorted(
        (end - (hours * 60 - i) * minute, device, telemetry(i))
        for device, hours in (("small", 25), ("big", 250))
        for i in range(hours * 60)
    )
    opened = Store.open(data_dir, 2)
    try:
        batches: dict[str, list[Pending]] = {}
        for ns, device, payload in items:
            name, dev_key = opened.locate(device)
            record = Record(f"devices/{device}/telemetry", payload)
            batches.setdefault(name, []).append(Pending(device, dev_key, ns, record))
        for name, batch in batches.items():
            opened.write(name, batch)
    finally:
        opened.close()
    counts = {"seeks": 0, "steps": 0}
    work: dict[str, dict[str, int]] = {}
    shown: dict[str, dict[str, Any]] = {}
    with StoreReader(data_dir) as reader:
        for part in reader.partitions.values():
            # A spy in place of the database: it counts and passes everything through.
            part._db = _CountingDb(part._db, counts)  # type: ignore[assignment]
        for device in ("small", "big"):
            counts.update(seeks=0, steps=0)
            shown[device] = pages.device_page(reader, device, {"buckets": "20", "limit": "10"})
            work[device] = dict(counts)
    assert work["big"] == work["small"]
    # 80 spans of one seek each, plus the table's; at most the budget plus the table's 11 reads.
    assert work["big"]["seeks"] == 80 + 1
    assert work["big"]["steps"] <= 400 + 11
    for device, total in (("small", 1500), ("big", 15000)):
        series = shown[device]["series"]
        assert shown[device]["device"]["count"] == total  # the index's count, exact
        assert series["records_read"] <= 400
        estimated = sum(series["per_minute"]) * series["bucket_seconds"] / 60
        assert estimated == pytest.approx(1440, rel=0.05)
        assert len(shown[device]["messages"]["items"]) == 10


def test_gaps_in_the_window_come_with_the_plots(client: TestClient) -> None:
    series = get_json(client, "/devices/sensor-01?range=all")["series"]
    assert series["gaps"] == [
        {
            "since": "2026-01-01T00:30:00.000000000Z",
            "until": "2026-01-01T00:35:00.000000000Z",
            "reason": "session-lost",
            "since_s": (BASE_NS + 1800 * S) / S,
            "until_s": (BASE_NS + 2100 * S) / S,
        }
    ]
    outside = get_json(client, "/devices/sensor-01?range=10m")["series"]
    assert outside["gaps"] == []


def test_time_range_picker(client: TestClient) -> None:
    hour = get_json(client, "/devices/sensor-01?range=1h")["window"]
    assert hour == {
        "since": "2026-01-01T00:39:50.000000001Z",
        "until": "2026-01-01T01:39:50.000000001Z",
        "range": "1h",
    }
    # The page's datetime-local inputs send no zone: UTC, as the page says.
    custom = get_json(client, "/devices/sensor-01?since=2026-01-01T00:10&until=2026-01-01T00:20")
    assert custom["window"]["since"] == "2026-01-01T00:10:00.000000000Z"
    series = custom["series"]
    assert sum(series["per_minute"]) * series["bucket_seconds"] / 60 == pytest.approx(60)
    bad = client.get("/devices/sensor-01?since=yesterday", headers=JSON)
    assert bad.status_code == 400
    assert "since" in bad.json()["error"]


# ---- messages ----------------------------------------------------------------------------------


def test_message_table_pages_newest_first(client: TestClient) -> None:
    first = get_json(client, "/devices/sensor-01?range=all&limit=250")["messages"]
    assert len(first["items"]) == 250
    assert first["items"][0]["ts"] == "2026-01-01T01:39:50.000000000Z"
    seen = [m["ts_ns"] for m in first["items"]]
    before = first["next_before"]
    while before is not None:
        page = get_json(client, f"/devices/sensor-01?range=all&limit=250&before={before}")
        seen += [m["ts_ns"] for m in page["messages"]["items"]]
        before = page["messages"]["next_before"]
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen)) == 600


def test_binary_payload_shows_as_hex_with_its_base64(client: TestClient) -> None:
    item = get_json(client, "/devices/bin-1?range=all")["messages"]["items"][0]
    assert item["encoding"] == "base64"
    page = client.get("/devices/bin-1?range=all").text
    assert "00 ff 10 3c" in page
    assert f'data-b64="{item["payload"]}"' in page


def test_download_is_what_export_writes(client: TestClient, fleet: Path) -> None:
    since, until = "2026-01-01T00:10:00Z", "2026-01-01T00:20:00Z"
    query = f"since={since}&until={until}"
    for fmt in ("jsonl", "csv"):
        got = client.get(f"/devices/sensor-01/download.{fmt}?{query}")
        assert got.status_code == 200
        assert "attachment" in got.headers["content-disposition"]
        export = exported(
            fleet, "--device", "sensor-01", "--since", since, "--until", until, "--format", fmt
        )
        assert got.content == export
    lines = client.get(f"/devices/sensor-01/download.jsonl?{query}").text.splitlines()
    assert len(lines) == 60
    text = client.get(f"/devices/sensor-01/download.csv?{query}").text
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][0] == "device"
    assert len(rows) == 61


# ---- ids and escaping --------------------------------------------------------------------------


@pytest.mark.parametrize("device", [*ODD_IDS, "xss<b>", "sensor-01"])
def test_device_ids_survive_the_path(client: TestClient, device: str) -> None:
    assert decode_device(encode_device(device)) == device
    data = get_json(client, f"/devices/{encode_device(device)}")
    assert data["device"]["device"] == device
    listing = client.get("/?limit=100").text
    assert f'href="/devices/{encode_device(device)}"' in listing


def test_a_percent_encoded_id_is_found_too(client: TestClient) -> None:
    assert get_json(client, "/devices/with%20space")["device"]["device"] == "with space"
    assert get_json(client, "/devices/50%25")["device"]["device"] == "50%"


def test_unknown_device_and_bad_encoding_are_404(client: TestClient) -> None:
    assert client.get("/devices/nobody", headers=JSON).status_code == 404
    assert client.get("/devices/bad~zz").status_code == 404


def test_stored_markup_shows_as_text_everywhere(client: TestClient) -> None:
    device_page = client.get(f"/devices/{encode_device('xss<b>')}?range=all").text
    listing = client.get("/").text
    for page in (device_page, listing):
        assert "<b>" not in page
        assert "<script>alert" not in page
    assert "xss&lt;b&gt;" in listing
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in device_page
    assert "devices/xss/&lt;i&gt;" in device_page
    # The plots' data element cannot be closed by stored text either.
    assert "</script>alert" not in device_page
    assert (
        get_json(client, f"/devices/{encode_device('xss<b>')}")["messages"]["items"][0]["payload"]
        == SCRIPT
    )


def test_pages_forbid_inline_script(client: TestClient) -> None:
    policy = client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy


# ---- read-only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("url", ["/", "/devices/sensor-01", "/store"])
def test_nothing_changes_data(client: TestClient, method: str, url: str) -> None:
    assert client.request(method, url).status_code == 405
    assert get_json(client, "/devices/sensor-01")["device"]["count"] == 600


def test_store_page_partitions_and_gaps(client: TestClient) -> None:
    data = get_json(client, "/store")
    assert [p["name"] for p in data["partitions"]] == ["p0", "p1", "p2"]
    assert data["total"]["messages"] == 600 + 60 + len(ODD_IDS) + 2
    assert data["total"]["devices"] == 4 + len(ODD_IDS)
    assert all(p["disk_bytes"] > 0 for p in data["partitions"])
    assert data["gaps"] == [
        {
            "since": "2026-01-01T00:30:00.000000000Z",
            "until": "2026-01-01T00:35:00.000000000Z",
            "reason": "session-lost",
        }
    ]
    assert "session-lost" in client.get("/store").text


def test_new_data_shows_within_a_refresh(data_dir: Path) -> None:
    writer = Store.open(data_dir, 2)
    try:
        write(writer, "live", [(BASE_NS, b'{"v": 1}')])
        with TestClient(create_app(data_dir)) as c:
            assert get_json(c, "/devices/live")["device"]["count"] == 1
            write(writer, "live", [(BASE_NS + S, b'{"v": 2}')])
            wait_until(
                lambda: get_json(c, "/devices/live")["device"]["count"] == 2,
                timeout=5,
                what="the second message on the page",
            )
    finally:
        writer.close()


# ---- the token ---------------------------------------------------------------------------------


@pytest.fixture
def guarded(fleet: Path) -> Iterator[TestClient]:
    with TestClient(create_app(fleet, token="s3cret")) as c:
        yield c


def test_token_required_for_data(guarded: TestClient) -> None:
    assert guarded.get("/", headers=JSON).status_code == 401
    assert guarded.get("/store?format=json").status_code == 401
    download = guarded.get("/devices/sensor-01/download.jsonl", follow_redirects=False)
    assert download.status_code == 303
    page = guarded.get("/devices/sensor-01", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fdevices%2Fsensor-01"
    assert guarded.get("/", headers={**JSON, "authorization": "Bearer wrong"}).status_code == 401
    ok = guarded.get("/", headers={**JSON, "authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert guarded.get("/static/web.css").status_code == 200


def test_login_form_sets_an_httponly_cookie(guarded: TestClient) -> None:
    assert guarded.get("/login").status_code == 200
    wrong = guarded.post("/login", data={"token": "nope", "next": "/store"})
    assert wrong.status_code == 401
    assert COOKIE not in wrong.cookies
    right = guarded.post(
        "/login", data={"token": "s3cret", "next": "/store"}, follow_redirects=False
    )
    assert right.status_code == 303
    assert right.headers["location"] == "/store"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "s3cret" not in cookie
    assert get_json(guarded, "/store")["partitions"]
    guarded.post("/logout")
    guarded.cookies.clear()
    assert guarded.get("/", headers=JSON).status_code == 401


def test_login_goes_only_to_this_site(guarded: TestClient) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil"):
        done = guarded.post(
            "/login", data={"token": "s3cret", "next": target}, follow_redirects=False
        )
        assert done.headers["location"] == "/"


def test_a_token_in_the_url_is_not_accepted(guarded: TestClient) -> None:
    assert guarded.get("/?format=json&token=s3cret").status_code == 401


# ---- the command ---------------------------------------------------------------------------------


def test_bind_beyond_loopback_needs_a_token(fleet: Path) -> None:
    with pytest.raises(UsageError) as caught:
        run_web(fleet, "0.0.0.0:8080", None, env={})
    assert caught.value.exit_code == EXIT_USAGE
    message = caught.value.message()
    assert "\n" not in message
    assert "MQTT_BACKUP_WEB_TOKEN" in message


@pytest.mark.parametrize("bind", ["8080", "host:", ":80", "h:99999", "[::1]:x"])
def test_bad_bind_is_a_usage_error(bind: str) -> None:
    with pytest.raises(UsageError):
        parse_bind(bind)


def test_bind_forms() -> None:
    assert parse_bind("[::1]:8080").loopback
    assert parse_bind("localhost:1").loopback
    assert not parse_bind("0.0.0.0:80").loopback
    assert not parse_bind("example.org:80").loopback


def test_served_connections_send_without_delay() -> None:
    # Found by `make bench`: the socket was made without its protocol, so asyncio (which
    # uvicorn serves on) left Nagle on, and every keep-alive response after the first waited
    # ~40 ms for a delayed ACK. The accepted connection must have TCP_NODELAY.
    async def nodelay_of_a_connection() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def accepted(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listen(parse_bind("127.0.0.1:0")))
        async with server:
            port = server.sockets[0].getsockname()[1]
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(nodelay_of_a_connection()) != 0


def test_token_from_file_then_env(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("from-file\n")
    assert load_token(file, {"MQTT_BACKUP_WEB_TOKEN": "from-env"}) == "from-file"
    assert load_token(None, {"MQTT_BACKUP_WEB_TOKEN": "from-env"}) == "from-env"
    assert load_token(None, {}) is None
    file.write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        load_token(file, {})
    with pytest.raises(UsageError, match="cannot read"):
        load_token(tmp_path / "missing", {})


def test_missing_store_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as caught:
        run_web(tmp_path / "nothing", "127.0.0.1:0", None, env={})
    assert caught.value.exit_code == EXIT_STORAGE


def test_the_web_command_serves_until_sigterm(fleet: Path, tmp_path: Path) -> None:
    port = devbroker.free_port()
    token = tmp_path / "token"
    token.write_text("t0k\n")
    command = ["web", "--data", str(fleet), "--bind", f"0.0.0.0:{port}", "--token-file", str(token)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqtt_backup", *command],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/store?format=json", headers={"authorization": "Bearer t0k"}
        )
        answer: list[Any] = []
        wait_until(_fetches(request, answer), timeout=30, what="the web view answering")
        assert [p["name"] for p in answer[0]["partitions"]] == ["p0", "p1", "p2"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # Found in review: it printed nothing, so a new user could not tell where it listened.
    assert f"web view of {fleet} at http://0.0.0.0:{port}/ (read-only; Ctrl-C stops)" in err
    assert "t0k" not in err


def _fetches(request: urllib.request.Request, into: list[Any]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                into.append(json.load(response))
                return True
        except OSError:
            return False

    return check
