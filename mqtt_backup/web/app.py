"""The ASGI app: routes, the JSON twins, templates, security headers. Read-only throughout."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mqtt_backup import logs
from mqtt_backup.errors import BackupError, StorageError, UsageError
from mqtt_backup.web import auth, history, pages
from mqtt_backup.web.paths import decode_device, encode_device
from mqtt_backup.web.source import REFRESH_S, Source

HERE = Path(__file__).parent
# No inline script or style anywhere: data reaches the page's script as a JSON element.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=PackageLoader("mqtt_backup.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters["device_url"] = pages.device_url
    env.filters["encode_device"] = encode_device
    env.filters["size"] = _size
    env.filters["duration"] = _duration
    env.filters["count"] = logs.count  # `{{ n | count("message") }}`: 1 message, 2 messages
    env.globals["spark_points"] = history.spark_points
    env.globals["display"] = pages.display
    env.globals["flags"] = pages.flags
    return Jinja2Templates(env=env)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the headers on the response's start."""

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Views:
    """The endpoints, around one Source and the templates."""

    def __init__(self, source: Source, token: str | None, clock: Callable[[], int]) -> None:
        self.source = source
        self.token = token
        self.clock = clock
        self.templates = _templates()

    def render(
        self, request: Request, template: str, data: dict[str, Any], status: int = 200
    ) -> Response:
        """The JSON twin, or the page that shows the same document."""
        if auth.wants_json(request):
            return JSONResponse(data, status_code=status)
        context = {"data": data, "login": self.token is not None}
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    def devices(self, request: Request) -> Response:
        """`/`: the device list."""
        with self.source.reading() as reader:
            data = pages.devices_page(reader, request.query_params, self.clock())
        return self.render(request, "devices.html", data)

    def device(self, request: Request) -> Response:
        """`/devices/{device}`: plots, gaps and messages of one device's window."""
        device = _device_param(request)
        with self.source.reading() as reader:
            data = pages.device_page(reader, device, request.query_params)
        return self.render(request, "device.html", data)

    def download(self, request: Request) -> Response:
        """`/devices/{device}/download.{fmt}`: the window as `export` writes it."""
        device = _device_param(request)
        fmt = request.path_params["fmt"]
        if fmt not in ("jsonl", "csv"):
            raise pages.NotFound(f"no download format {fmt!r}: jsonl or csv")
        with self.source.reading() as reader:
            found = reader.device(device)
            if found is None:
                raise pages.NotFound(f"no device {device!r} in this store")
            win = pages.window(found, request.query_params)
        media = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
        name = f"{encode_device(device)}.{fmt}"
        return StreamingResponse(
            pages.export_chunks(self.source.data_dir, device, win, fmt),
            media_type=f"{media}; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    def store(self, request: Request) -> Response:
        """`/store`: partitions and gaps."""
        with self.source.reading() as reader:
            data = pages.store_page(reader)
        return self.render(request, "store.html", data)

    async def login(self, request: Request) -> Response:
        """`/login`: the form (GET), or check the token and set the session cookie (POST)."""
        if self.token is None:
            return RedirectResponse("/", status_code=303)
        if request.method == "GET":
            data = {"next": auth.safe_next(request.query_params.get("next")), "error": None}
            return self.render(request, "login.html", data)
        given, target = await auth.form_token(request)
        if not auth.hmac_equal(given, self.token):
            data = {"next": auth.safe_next(target), "error": "That is not the token."}
            return self.render(request, "login.html", data, status=401)
        response = RedirectResponse(auth.safe_next(target), status_code=303)
        auth.session_cookie(response, self.token, secure=request.url.scheme == "https")
        return response

    async def logout(self, _request: Request) -> Response:
        """`/logout` (POST): forget the session cookie."""
        response = RedirectResponse("/login" if self.token else "/", status_code=303)
        response.delete_cookie(auth.COOKIE, path="/")
        return response

    async def failed(self, request: Request, exc: Exception) -> Response:
        """A BackupError as a page or JSON: 404 unknown, 400 bad input, 503 storage."""
        assert isinstance(exc, BackupError)
        status = 503 if isinstance(exc, StorageError) else 400
        if isinstance(exc, pages.NotFound):
            status = 404
        return self.render(request, "error.html", {"error": exc.message()}, status=status)


def _device_param(request: Request) -> str:
    device = decode_device(request.path_params["device"])
    if device is None:
        raise pages.NotFound("not a device path: ids use ~XX for each byte outside A-Z a-z 0-9 _ -")
    return device


def create_app(
    data_dir: Path,
    token: str | None = None,
    *,
    refresh_s: float = REFRESH_S,
    clock: Callable[[], int] = time.time_ns,
) -> Starlette:
    """The read-only web view of a data directory; with a token, nothing is shown without it.

    Opens the store at once (a StorageError says why it cannot) and closes it at shutdown.
    `clock` gives "now" in epoch ns (for a device's silence).
    """
    if token is not None and not token:
        raise UsageError("the web token is empty")
    source = Source(data_dir, refresh_s)
    views = Views(source, token, clock)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            source.close()

    routes = [
        Route("/", views.devices, name="devices"),
        Route("/devices/{device}", views.device, name="device"),
        Route("/devices/{device}/download.{fmt}", views.download, name="download"),
        Route("/store", views.store, name="store"),
        Route("/login", views.login, methods=["GET", "POST"], name="login"),
        Route("/logout", views.logout, methods=["POST"], name="logout"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders), Middleware(auth.RequireToken, token=token)],
        exception_handlers={BackupError: views.failed},
        lifespan=lifespan,
    )
    app.state.source = source
    return app
