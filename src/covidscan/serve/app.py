"""FastAPI app factory: nothing loads at import; the caller passes a ready Predictor.

Endpoints (:mod:`covidscan.serve.routes`): ``POST /predict`` (multipart field ``file``: PNG / JPEG / DICOM,
sniffed from the content, never the name; ``?heatmap=true`` adds a Grad-CAM PNG as base64, ``&target=<class>``
picks its class), ``POST /predict_study`` (CT models: a zip of a DICOM series or a NIfTI file -> one patient
result), ``GET /model``, ``GET /health``, ``GET /`` (an upload page) and the OpenAPI schema at ``/openapi.json``
(docs at ``/docs``, served offline). The middlewares (:mod:`covidscan.serve.middleware`) enforce the body limit
while the request is read, time out stalled and trickled uploads, check the token and (for a token-less local
service) the Host header, and add security headers. The Predictor serialises forward passes with a lock.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from covidscan.serve.middleware import BodyLimit, HostGuard, SecurityHeaders, StallGuard, TokenGuard
from covidscan.serve.routes import MAX_BATCH, Service, router

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes
DEFAULT_MAX_STUDY = 300 * 1024 * 1024  # a zipped CT series (also the limit on its uncompressed size x 3)
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file


def create_app(
    predictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_pending: int = 8,
    token: str | None = None,
    max_study_bytes: int = DEFAULT_MAX_STUDY,
    body_timeout: float = 30.0,
    allowed_hosts: tuple[str, ...] | None = None,
):
    """The app; ``max_pending`` predictions may wait or run at once (more get 503 with Retry-After);
    ``token`` (when given) is required on every path but ``/health``; a body with no data for ``body_timeout``
    seconds, or not complete in four times that, gets 408; ``allowed_hosts``: the Host names served (None: any);
    CT models also take whole studies at ``POST /predict_study`` (at most ``max_study_bytes``)."""
    from fastapi import FastAPI

    if max_pending < 1:
        raise ValueError(f"max_pending={max_pending}: at least 1 (with fewer every prediction would be refused)")
    app = FastAPI(
        title="covidscan",
        version=str(predictor.meta.versions.get("covidscan", "")),
        description="COVID-19 detection on chest scans. Research use only; not a medical device.",
        docs_url=None,  # served below from local files: FastAPI's default loads Swagger UI from a CDN
        redoc_url=None,
    )
    _offline_docs(app)
    app.state.service = Service(
        predictor,
        max_upload_bytes,
        max_study_bytes,
        max_pending,
        files("covidscan.serve").joinpath("index.html").read_text("utf-8"),
    )
    app.include_router(router)
    limits = {
        "/predict_study": max_study_bytes + MULTIPART_SLACK,
        "/predict_batch": MAX_BATCH * (max_upload_bytes + MULTIPART_SLACK),
    }
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes + MULTIPART_SLACK, path_limits=limits)
    app.add_middleware(StallGuard, timeout=body_timeout)
    if token:
        app.add_middleware(TokenGuard, token=token)
    if allowed_hosts:
        app.add_middleware(HostGuard, allowed=tuple(allowed_hosts))
    app.add_middleware(SecurityHeaders)
    return app


def _offline_docs(app) -> None:
    """``/docs`` (Swagger UI 5, which reads the OpenAPI 3.1 schema FastAPI writes) and ``/redoc``, with their
    files from the ``fastapi-offline`` package (MIT), so both work with no network."""
    from importlib.util import find_spec

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    static = Path(find_spec("fastapi_offline").origin).parent / "static"  # its files only: nothing of it is imported
    app.mount("/docs-assets", StaticFiles(directory=static), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="covidscan API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return get_redoc_html(
            openapi_url=app.openapi_url, title="covidscan API", redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False,
        )  # fmt: skip
