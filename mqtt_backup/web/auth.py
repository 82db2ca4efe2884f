"""The token: a Bearer header, or a login form that sets an HttpOnly cookie; never in a URL.

The cookie does not hold the token itself but an HMAC of a fixed text keyed by it: a leaked
cookie does not reveal the token, and a new token (a restart with another file) ends every
session.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "mqtt_backup_session"
# Paths served without a token: the login form and the static files it needs (no data there).
OPEN_PREFIXES = ("/login", "/static/")
MAX_FORM_BYTES = 4096


def session_value(token: str) -> str:
    """The cookie's value for a token."""
    return hmac.new(token.encode(), b"mqtt-backup web session", hashlib.sha256).hexdigest()


def hmac_equal(given: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the real one."""
    return hmac.compare_digest(given.encode(), token.encode())


def authorized(request: Request, token: str) -> bool:
    """Whether the request carries the token (Bearer) or a session cookie made from it."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac_equal(given.strip(), token):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac_equal(cookie, session_value(token))


def wants_json(request: Request) -> bool:
    """`?format=json`, or an Accept header that prefers JSON to HTML (datasette's twins)."""
    if request.query_params.get("format") == "json":
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only (no `//host`, no scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def form_token(request: Request) -> tuple[str, str]:
    """(token, next) from a urlencoded login form, parsed here (no multipart dependency)."""
    body = await request.body()
    fields = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace"))
    return fields.get("token", [""])[0].strip(), fields.get("next", ["/"])[0]


def session_cookie(response: Response, token: str, secure: bool) -> None:
    """Set the session cookie: HttpOnly, SameSite=Strict, Secure over https."""
    response.set_cookie(
        COOKIE,
        session_value(token),
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )


class RequireToken:
    """ASGI middleware: every path but the open ones needs the token (when there is one)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass authorized requests on; answer the others with 401 or the login form."""
        path = scope.get("path", "")
        if (
            self.token is None
            or scope["type"] != "http"
            or path.startswith(OPEN_PREFIXES)
            or authorized(Request(scope), self.token)
        ):
            await self.app(scope, receive, send)
            return
        await _refusal(Request(scope))(scope, receive, send)


def _refusal(request: Request) -> Response:
    if wants_json(request) or request.method != "GET":
        return JSONResponse(
            {"error": "this view needs a token: Authorization: Bearer <token>, or log in"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
