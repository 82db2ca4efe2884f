"""The web view in a real headless Chromium (Debian's `chromium`, driven by Playwright).

No browser download: Playwright is pointed at the system's binary. Screenshots go to the test's
temp dir (pytest keeps the last runs' dirs), so a failure can be looked at.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from mqtt_backup.storage import ballast
from mqtt_backup.web import create_app
from mqtt_backup.web.paths import encode_device
from tests.conftest import wait_until
from tests.webstore import BASE_NS, ODD_IDS, SCRIPT, S, exported, fleet_store

# A real Chromium costs 15-30 s of CPU: `make test` only. test_web checks the same pages' HTML,
# links, escaping and downloads in this process; here are what only a browser shows (the plots
# drawn, the copy button, navigation by the links' accessible names).
# One worker for the module: its Chromium, store and web server are module fixtures, which a
# second pytest-xdist worker would build again (4-5 s on a loaded machine).
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.xdist_group("browser")]

CHROMIUM = "/usr/bin/chromium"
NOW_NS = BASE_NS + 6000 * S
DEVICES = 4 + len(ODD_IDS)


class WebServer:
    """uvicorn serving the app on a free loopback port, in a thread of this process."""

    def __init__(self, data: Path, token: str | None = None) -> None:
        self.app = create_app(data, token, clock=lambda: NOW_NS)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.app.state.source.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        # --no-sandbox: the tests run as root, where Chromium refuses its sandbox.
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: every test only reads it (each has its own browser context)."""
    data = tmp_path_factory.mktemp("fleet") / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ballast, "MAX_BYTES", 1024 * 1024)  # as clean_env does for each test
        fleet_store(data)
    return data


@pytest.fixture(scope="module")
def web(fleet: Path) -> Iterator[WebServer]:
    server = WebServer(fleet)
    yield server
    server.stop()


class Watched:
    """A page with its console errors, uncaught exceptions and dialogs recorded."""

    def __init__(self, browser: Browser, shots: Path) -> None:
        self.context = browser.new_context(
            accept_downloads=True, viewport={"width": 1200, "height": 900}
        )
        self.page = self.context.new_page()
        self.shots = shots
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(message.text)

    def _dialog(self, dialog: object) -> None:
        self.dialogs.append(str(dialog))

    def visit(self, url: str, shot: str) -> Page:
        response = self.page.goto(url)
        assert response is not None
        assert response.status == 200, response.status
        # goto returned at the load event: the pages fetch nothing after it (no XHR), so there
        # is no "network idle" to wait for (Playwright's takes 0.5 s of quiet each time).
        self.page.screenshot(path=self.shots / f"{shot}.png", full_page=True)
        return self.page


@pytest.fixture
def tab(browser: Browser, tmp_path: Path) -> Iterator[Watched]:
    watched = Watched(browser, tmp_path)
    yield watched
    watched.context.close()


# Pixels of the gap shading (a light red) against the plots' white, blue and orange.
GAP_PIXELS = """
(canvas) => {
  const ctx = canvas.getContext("2d");
  const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
  let painted = 0, gap = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
    if (a > 0) painted++;
    if (a > 0 && r - g > 15 && Math.abs(g - b) < 8) gap++;
  }
  return [painted, gap];
}
"""


def test_devices_page_lists_the_stored_devices(web: WebServer, tab: Watched) -> None:
    page = tab.visit(web.url + "/?limit=100", "devices")
    links = page.locator("table.devices a.device")
    assert links.count() == DEVICES
    assert "sensor-01" in links.all_inner_texts()
    assert page.locator("tr.silent a.device").all_inner_texts() == ["quiet-02"]
    assert page.locator("svg.spark polyline").count() == DEVICES
    page.fill("input[name=prefix]", "sens")
    page.click("form.filters button")
    page.wait_for_url(lambda url: "prefix=sens" in url)  # the filtered list has loaded
    assert page.locator("table.devices a.device").all_inner_texts() == ["sensor-01"]
    assert tab.errors == []


def test_device_page_draws_a_plot_per_field_with_gaps_shaded(web: WebServer, tab: Watched) -> None:
    page = tab.visit(web.url + "/devices/sensor-01?range=all", "device")
    page.wait_for_selector("#plots[data-drawn=true]")
    titles = page.locator(".plot .u-title").all_inner_texts()
    assert titles == [
        "messages per minute",
        "battery",
        "cells.0",
        "cells.1",
        "env.hum",
        "temp_c",
    ]
    for canvas in page.locator(".plot canvas").all():
        painted, gap = canvas.evaluate(GAP_PIXELS)
        assert painted > 1000  # lines, fill and axes drawn, not a blank canvas
        assert gap > 500  # the 00:30-00:35 session-lost gap
    # A window without a gap has no shading.
    page = tab.visit(web.url + "/devices/sensor-01?range=10m", "device-no-gap")
    page.wait_for_selector("#plots[data-drawn=true]")
    painted, gap = page.locator(".plot canvas").first.evaluate(GAP_PIXELS)
    assert painted > 1000
    assert gap == 0
    assert tab.errors == []


# Pixels of the mean's orange (#c05621) and the rate's blue (#2b6cb0), antialiased edges included.
SERIES_PIXELS = """
(canvas) => {
  const ctx = canvas.getContext("2d");
  const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
  let orange = 0, blue = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
    if (a > 0 && r > 150 && g > 50 && g < 130 && b < 80) orange++;
    if (a > 0 && b > 140 && b - r > 80 && g > 80 && g < 140) blue++;
  }
  return [orange, blue];
}
"""


def test_a_lone_message_is_drawn_as_a_point(web: WebServer, tab: Watched) -> None:
    # One message in the window: one bucket with a value between empty ones, so no line joins
    # it to anything; uPlot hides points on a dense axis, which left the plot blank.
    page = tab.visit(web.url + f"/devices/{encode_device('hall.temp')}?range=1d", "lone")
    page.wait_for_selector("#plots[data-drawn=true]")
    assert page.locator(".plot .u-title").all_inner_texts() == ["messages per minute", "v"]
    rate, field = page.locator(".plot canvas").all()
    assert rate.evaluate(SERIES_PIXELS)[1] > 0
    assert field.evaluate(SERIES_PIXELS)[0] > 0  # the mean's point
    summary = page.locator("p.summary").inner_text()
    assert summary.startswith("1 message ("), summary
    assert "(1 record read)" in page.locator("p.note").inner_text()
    assert tab.errors == []


def test_stored_script_is_shown_as_text(web: WebServer, tab: Watched) -> None:
    page = tab.visit(f"{web.url}/devices/{encode_device('xss<b>')}?range=all", "xss")
    assert page.locator("h1.device-id").inner_text() == "xss<b>"
    assert page.locator("td.payload pre").inner_text() == SCRIPT
    assert page.locator("td.topic").inner_text() == "devices/xss/<i>"
    # Only the plots' data element: no element came from the stored text.
    assert page.locator("main b, main i, main script:not(#series)").count() == 0
    assert tab.dialogs == []
    assert tab.errors == []


def test_odd_ids_are_reached_from_the_list(web: WebServer, tab: Watched) -> None:
    page = tab.page
    for device in ODD_IDS:
        page.goto(web.url + "/?limit=100")
        page.get_by_role("link", name=device, exact=True).click()
        page.wait_for_url(lambda url: "/devices/" in url)  # the device's page has loaded
        assert page.locator("h1.device-id").inner_text() == device
    assert tab.errors == []


def test_download_matches_export(web: WebServer, tab: Watched, fleet: Path) -> None:
    page = tab.visit(web.url + "/devices/sensor-01?range=1h", "device-hour")
    for fmt, label in (("jsonl", "JSONL"), ("csv", "CSV")):
        with page.expect_download() as caught:
            page.get_by_role("link", name=label, exact=True).click()
        got = Path(caught.value.path()).read_bytes()
        export = exported(
            fleet,
            *("--device", "sensor-01", "--format", fmt),
            *("--since", "2026-01-01T00:39:50.000000001Z"),
            *("--until", "2026-01-01T01:39:50.000000001Z"),
        )
        assert got == export
        assert got.count(b"\n") >= 360
    assert tab.errors == []


def test_binary_copy_button_copies_base64(web: WebServer, tab: Watched) -> None:
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web.url)
    page = tab.visit(web.url + "/devices/bin-1?range=all", "binary")
    assert page.locator("td.payload.binary pre").inner_text() == "00 ff 10 3c"
    page.click("button.copy")
    wait_until(lambda: page.locator("button.copy").inner_text() == "copied", timeout=10)
    assert page.evaluate("navigator.clipboard.readText()") == "AP8QPA=="
    assert tab.errors == []


def test_login_form_in_the_browser(fleet: Path, tab: Watched) -> None:
    server = WebServer(fleet, token="s3cret")
    try:
        page = tab.page
        page.goto(server.url + "/store")
        assert page.url.startswith(server.url + "/login")
        page.fill("input[name=token]", "wrong")
        page.click("form.login button")
        assert page.locator("p.error").inner_text() == "That is not the token."
        # The refused login answers 401, which Chromium reports on the console.
        assert [e for e in tab.errors if "401" not in e] == []
        tab.errors.clear()
        page.fill("input[name=token]", "s3cret")
        page.click("form.login button")
        page.wait_for_url(server.url + "/store")
        assert page.locator("table.partitions tbody tr").count() == 3
        # HttpOnly: the page's own scripts cannot read the session.
        assert page.evaluate("document.cookie") == ""
        assert "s3cret" not in page.url
        assert tab.errors == []
    finally:
        server.stop()
