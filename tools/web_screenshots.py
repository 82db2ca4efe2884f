"""`make screenshots`: the README's pictures of the web view, taken in headless Chromium.

Builds a small demo store (a few sensors for a day, one gone quiet, one session-lost gap) with
the project's own Store, serves it with the web view and photographs the devices page and a
device page into docs/. Never edit the pictures by hand: run this again.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from mqtt_backup.records import Record
from mqtt_backup.storage import Pending, Store
from mqtt_backup.storage.journal import Gap, GapLog
from mqtt_backup.web import create_app

S = 10**9
BASE_NS = 1_767_225_600 * S  # 2026-01-01T00:00:00Z
DAY_S = 86400
CHROMIUM = "/usr/bin/chromium"


def reading(device: int, t: int) -> bytes:
    """A sensor's plausible JSON: a daily temperature swing, a draining battery, humidity."""
    phase = 2 * math.pi * t / DAY_S
    body = {
        "temp_c": round(18 + 4 * math.sin(phase + device) + 0.3 * math.sin(t / 600), 2),
        "battery": round(100 - t / DAY_S * 12 - device, 1),
        "env": {"hum": round(45 + 10 * math.cos(phase), 1)},
    }
    return json.dumps(body).encode()


def demo_store(data: Path) -> None:
    """Five sensors reporting every minute for a day; `greenhouse-3` stops after 15 hours."""
    items: list[tuple[int, str, bytes]] = []
    for n in range(5):
        device = ("hall", "kitchen", "greenhouse-3", "attic", "cellar")[n]
        last = 15 * 3600 if device == "greenhouse-3" else DAY_S
        items += [(BASE_NS + t * S, device, reading(n, t)) for t in range(0, last, 60)]
    items.sort()
    store = Store.open(data, 2)
    try:
        batches: dict[str, list[Pending]] = {}
        for ns, device, payload in items:
            name, key = store.locate(device)
            record = Record(f"sensors/{device}/state", payload)
            batches.setdefault(name, []).append(Pending(device, key, ns, record))
        for name, batch in batches.items():
            store.write(name, batch)
    finally:
        store.close()
    GapLog(data).record(Gap(BASE_NS + 9 * 3600 * S, BASE_NS + 10 * 3600 * S, "session-lost"))


def main(out: Path) -> None:
    """Take docs/web-devices.png and docs/web-device.png."""
    with tempfile.TemporaryDirectory(prefix="mqtt-backup-shots-") as scratch:
        data = Path(scratch) / "data"
        demo_store(data)
        app = create_app(data, clock=lambda: BASE_NS + DAY_S * S)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(url + "/")
                page.screenshot(path=out / "web-devices.png")
                page.goto(url + "/devices/kitchen?range=1d")
                page.wait_for_selector("#plots[data-drawn=true]")
                page.screenshot(path=out / "web-device.png", full_page=False)
                browser.close()
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()
            app.state.source.close()
    print(f"wrote {out / 'web-devices.png'} and {out / 'web-device.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
