"""The pages a person opens in a browser: ``/ui`` (every engine of a model side by side on your
own photos) and ``/docs`` (Swagger UI over ``/openapi.json``). ``/`` redirects to ``/ui``.

Plain HTML, JS and CSS from ``gateway/api/static/``, no build step; Swagger UI is vendored
from the npm package ``swagger-ui-dist`` (``static/swagger-ui/VENDOR.md``). The pages and
their assets are open without an API key (``auth.open_without_key``): they hold no data, and
every API call they make carries the key the person typed in, like any other client's.
Nothing is loaded from elsewhere: the Content-Security-Policy below lets the pages reach
this origin only.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory

from gateway.api.auth import open_without_key

bp = Blueprint("ui", __name__)
STATIC = Path(__file__).resolve().parent / "static"
# Photos are shown from blob: URLs of the files the person picked; Swagger UI renders style
# attributes (React), hence 'unsafe-inline' for the styles of /docs only.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'{styles}; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'")


def _page(name: str, inline_styles: bool = False) -> Response:
    response = send_from_directory(STATIC, name, max_age=0)
    response.headers["Content-Security-Policy"] = CSP.format(styles=" 'unsafe-inline'" if inline_styles else "")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/")
@open_without_key
def index():
    return redirect("ui", code=302)  # relative: works behind a proxy that adds a path prefix


@bp.get("/ui")
@open_without_key
def compare_page():
    return _page("ui.html")


@bp.get("/docs")
@open_without_key
def docs_page():
    return _page("docs.html", inline_styles=True)


@bp.get("/ui/static/<path:filename>")
@open_without_key
def asset(filename: str):
    """The pages' scripts, styles and the vendored Swagger UI (send_from_directory refuses ``..``)."""
    response = send_from_directory(STATIC, filename, max_age=3600)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
