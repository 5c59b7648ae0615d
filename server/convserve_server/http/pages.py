"""The files served to browsers: the page at ``/``, the OpenAPI document and its Swagger UI page.

Everything comes from installed packages (this one's ``static/`` folder and ``swagger-ui-bundle``'s files),
never from a CDN, so the pages work in an air-gapped cluster.  Files are read once, on first request.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from swagger_ui_bundle import swagger_ui_path

from convserve_server.http.errors import NOT_FOUND, HttpError
from convserve_server.http.messages import Call, Reply

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
    ".png": b"image/png",
}
PAGE_FILES = frozenset({"index.html", "page.js", "page.css"})
SWAGGER_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})
SECURITY_HEADERS = [
    # The page's own files only: nothing loaded from elsewhere, no framing by other sites.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-cache"),
]


@functools.cache
def _read(folder: str, name: str) -> bytes:
    base = resources.files("convserve_server.http") / "static" if folder == "static" else Path(str(swagger_ui_path))
    return (base / name).read_bytes()


def _file_reply(folder: str, name: str) -> Reply:
    content_type = CONTENT_TYPES[Path(name).suffix]
    return Reply(_read(folder, name), headers=[(b"content-type", content_type), *SECURITY_HEADERS])


class Pages:
    """Handlers of the browser-facing files."""

    async def index(self, call: Call) -> Reply:
        """The page to try a model."""
        return _file_reply("static", "index.html")

    async def static(self, call: Call) -> Reply:
        """The page's script and style."""
        name = call.params["file"]
        if name not in PAGE_FILES:
            raise HttpError(NOT_FOUND, f"no file {name!r:.64}")
        return _file_reply("static", name)

    async def openapi(self, call: Call) -> Reply:
        """The OpenAPI document of the HTTP API."""
        return _file_reply("static", "openapi.json")

    async def docs(self, call: Call) -> Reply:
        """Swagger UI over the OpenAPI document."""
        return _file_reply("static", "docs.html")

    async def docs_asset(self, call: Call) -> Reply:
        """Swagger UI's own files, from the swagger-ui-bundle package."""
        name = call.params["file"]
        if name == "docs.js":
            return _file_reply("static", name)
        if name not in SWAGGER_FILES:
            raise HttpError(NOT_FOUND, f"no file {name!r:.64}")
        return _file_reply("swagger", name)
