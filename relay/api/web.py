"""The key workbench and the operator console (``relay/web/``): static files shipped in the
package, served as they are.

``GET /workbench`` is the key workbench; ``GET /`` is the workbench for a browser (``Accept:
text/html``) and the relay's JSON self-description for everything else (health checkers,
scripts), as before. ``GET /console`` is the operator console, which draws the admin API with
the admin token the operator types in. Both pages speak English and Chinese (``i18n.js``).
The files are read once, at start-up; there is no build step and nothing is loaded from other
sites, so the page works offline.

Every answer carries a Content-Security-Policy that lets the page talk only to this relay and
run only its own script, ``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``: the
page handles a pasted key, and these keep it from leaving through a third-party resource, a
``Referer`` header or a cached copy.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from ..errors import NotFound
from .http import Request, Responder

if TYPE_CHECKING:
    from ..runtime import Runtime

#: File name → content type, for the files under ``relay/web/`` that are served.
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "console.html": b"text/html; charset=utf-8",
    "i18n.js": b"text/javascript; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
}

#: The pages: served at their own paths, not under ``/web/``.
PAGES = frozenset({"index.html", "console.html"})

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def load_files() -> dict[str, bytes]:
    """Every served file's bytes (from the installed package)."""
    folder = resources.files("relay") / "web"
    return {name: (folder / name).read_bytes() for name in FILES}


class Web:
    def __init__(self) -> None:
        self.files = load_files()

    async def _send(self, responder: Responder, name: str) -> None:
        await responder.raw(200, self.files[name], FILES[name], SECURITY_HEADERS)

    async def page(self, runtime: Runtime, request: Request, responder: Responder) -> None:
        await self._send(responder, "index.html")

    async def console(self, runtime: Runtime, request: Request, responder: Responder) -> None:
        await self._send(responder, "console.html")

    async def asset(self, runtime: Runtime, request: Request, responder: Responder) -> None:
        name = request.params["name"]
        if name in PAGES or name not in self.files:
            raise NotFound(f"No such file: /web/{name}.", code="unknown_url")
        await self._send(responder, name)

    def wants_page(self, request: Request) -> bool:
        return "text/html" in request.headers.get("accept", "")
