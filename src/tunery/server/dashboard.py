"""The web dashboard: one page at `/` and its built assets at `/static/`. The page calls Replicate's
/v1 API (and `/v1/files/{id}/check`, the one file check) like any client.

The page is a static bundle built from `web/` (`npm ci && npm run build` writes it into
`static/` beside this file, which ships in the package). It holds no data and no secrets:
everything it shows it fetches from the /v1 API with the token the user signs in with, under the
same tenant rules as any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

#: The page loads nothing from anywhere but this server (no CDN), and is never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_NOT_BUILT = """<!doctype html><meta charset="utf-8"><title>tunery</title>
<p>The tunery dashboard is not built. In the source tree run
<code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>. The API is at <a href="/docs">/docs</a>.</p>
"""


def install(app: FastAPI, static_dir: Path = STATIC) -> None:
    """Serve the dashboard on `app`: `/` (the page) and `/static/*` (its assets)."""

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        index = static_dir / "index.html"
        if not index.is_file():
            return HTMLResponse(_NOT_BUILT, status_code=503, headers=SECURITY_HEADERS)
        return FileResponse(index, media_type="text/html", headers=SECURITY_HEADERS)

    if static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")
