"""``GET /``: the browser demo page (static HTML/JS/CSS shipped in ``service/static``).

The page talks to the service only through the public API (``/v1/pose``, ``/v1/models``,
``/v1/jobs``), so it needs no API key itself; the key the user types is sent by the page.
Kept out of the OpenAPI schema: it is a page, not an API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from ditepose.service.core.errors import ServiceError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Only these files are served: no path from the URL ever reaches the file system.
_ASSETS = {
    "demo-core.js": "text/javascript; charset=utf-8",
    "demo-jobs.js": "text/javascript; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/demo")
async def demo_redirect() -> RedirectResponse:
    return RedirectResponse("/")


@router.get("/demo/{name}")
async def asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise ServiceError("not_found", f"no demo asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
