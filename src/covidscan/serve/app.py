"""FastAPI app factory: nothing loads at import; the caller passes a ready Predictor.

Endpoints: ``POST /predict`` (multipart field ``file``: PNG / JPEG / DICOM, sniffed from
the content, never the name; ``?heatmap=true`` adds a Grad-CAM PNG as base64,
``&target=<class>`` picks its class), ``POST /predict_study`` (CT models: a zip of a DICOM series
or a NIfTI file -> one patient result, covidscan.study), ``GET /health``, ``GET /`` (an upload page) and the
OpenAPI schema at ``/openapi.json`` (docs at ``/docs``). The body limit is enforced while
the request is read (:class:`BodyLimit`, an ASGI middleware): a declared Content-Length over
the limit is refused at once, and a chunked body is counted and cut off at the limit, so no
upload over the limit is spooled to disk. The Predictor serialises forward passes with a lock.
"""

import base64
import hmac
import html
import io
from importlib.resources import files

from covidscan.data.io import ImageReadError, read_bytes
from covidscan.explain import low_probability_warning

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes
DEFAULT_MAX_STUDY = 300 * 1024 * 1024  # a zipped CT series (also the limit on its uncompressed size x 3)
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, decided before it is all read.

    With a Content-Length over the limit the app is never called. Otherwise the body is counted
    as it arrives; at the limit this middleware answers 413 itself, tells the app the client has
    gone (``http.disconnect``, so it stops reading and spools nothing more) and drops whatever the
    app still tries to send.
    """

    def __init__(self, app, max_bytes: int, path_limits: dict | None = None):
        self.app, self.max_bytes, self.path_limits = app, max_bytes, dict(path_limits or {})

    async def _reject(self, send, limit: int) -> None:
        body = b'{"detail":"upload larger than the limit of %d bytes"}' % limit
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope.get("path"), self.max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await self._reject(send, limit)
        seen, rejected = 0, False

        async def counted_receive():
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    rejected = True
                    await self._reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not rejected:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


class StallGuard:
    """ASGI middleware: a request whose body stops arriving for ``timeout`` seconds gets 408 and is dropped
    (slow or stalled uploads cannot hold a worker and a prediction slot forever). Slow headers are the
    server's part: uvicorn closes idle keep-alive connections after ``timeout_keep_alive``; put a reverse proxy
    (client_header_timeout) in front of a service that faces the internet."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import asyncio

        state = {"stalled": False, "started": False}

        async def timed_receive():
            if state["stalled"]:
                return {"type": "http.disconnect"}
            try:
                return await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                state["stalled"] = True
                if not state["started"]:
                    body = b'{"detail":"upload stalled: no data for %g seconds"}' % self.timeout
                    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
                    await send({"type": "http.response.start", "status": 408, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    state["started"] = True
                return {"type": "http.disconnect"}

        async def guarded_send(message):
            if state["stalled"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)


class TokenGuard:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer <token>`` or ``?token=<token>``."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
            query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode("latin-1").split("&") if "=" in p)
            if not (hmac.compare_digest(given, self.token) or hmac.compare_digest(query.get("token", ""), self.token)):
                body = b'{"detail":"a valid token is needed (Authorization: Bearer TOKEN, or ?token=TOKEN)"}'
                await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(
    predictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_pending: int = 8,
    token: str | None = None,
    max_study_bytes: int = DEFAULT_MAX_STUDY,
    body_timeout: float = 30.0,
):
    """The app; ``max_pending`` predictions may wait or run at once (more get 503 with Retry-After),
    ``token`` (when given) is required on every path but ``/health``; a body with no data for ``body_timeout``
    seconds gets 408 (:class:`StallGuard`); CT models also take whole studies
    at ``POST /predict_study`` (a zip of a DICOM series or a NIfTI file, at most ``max_study_bytes``)."""
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    app = FastAPI(
        title="covidscan",
        version=predictor.meta.versions.get("covidscan", ""),
        description="COVID-19 detection on chest scans. Research use only; not a medical device.",
        docs_url=None,  # served below from local files: FastAPI's default loads Swagger UI from a CDN
        redoc_url=None,
    )
    _offline_docs(app)
    app.add_middleware(
        BodyLimit, max_bytes=max_upload_bytes + MULTIPART_SLACK, path_limits={"/predict_study": max_study_bytes + MULTIPART_SLACK}
    )
    app.add_middleware(StallGuard, timeout=body_timeout)
    if token:
        app.add_middleware(TokenGuard, token=token)
    pending = {"n": 0}  # predictions admitted and not finished (one event loop: no lock needed)
    page = files("covidscan.serve").joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "task": predictor.task,
            "classes": predictor.class_names,
            "backbone": predictor.meta.backbone,
            "weights_source": predictor.meta.weights_source,
        }

    @app.get("/model")
    def model_info() -> dict:
        """What the page shows about the model: task, classes, architecture, weights, training data, validation
        metrics and the calibrated threshold (all from the checkpoint)."""
        m = predictor.meta
        return {
            "task": m.task,
            "classes": list(m.class_names),
            "backbone": m.backbone,
            "head": m.head,
            "description": m.extra.get("description", ""),
            "weights_source": m.weights_source,
            "image_size": m.preprocess.image_size,
            "train_counts": m.train_counts,
            "sources": m.sources,
            "split_protocol": m.split_protocol,
            "epoch": m.epoch,
            "val_metrics": m.val_metrics,
            "threshold": m.threshold,
            "versions": m.versions,
            "studies": m.task == "ct",
        }

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        # values from the checkpoint are text, never markup: escaped so a class name cannot inject script
        return page.replace("{{TASK}}", html.escape(predictor.task)).replace(
            "{{CLASSES}}", html.escape(", ".join(predictor.class_names))
        )

    @app.post("/predict")
    async def predict(
        request: Request,
        file: UploadFile = File(...),
        heatmap: bool = Query(False),
        target: str | None = Query(None, description="class for the heat map (default: predicted)"),
        force_heatmap: bool = Query(
            False, description="draw the heat map even for a class of probability < 0.1 or a scan outside what the model knows"
        ),
        preview: bool = Query(False, description="add the decoded scan as a gray PNG (base64; DICOM previews)"),
    ) -> dict:
        if pending["n"] >= max_pending:
            raise HTTPException(503, f"busy: {max_pending} predictions already running or waiting", headers={"Retry-After": "5"})
        pending["n"] += 1
        try:
            return await _predict(file, heatmap, target, force_heatmap, preview)
        finally:
            pending["n"] -= 1

    async def _predict(file, heatmap: bool, target: str | None, force_heatmap: bool, preview: bool = False) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than the {max_upload_bytes} byte limit")
        if not data:
            raise HTTPException(400, "empty upload")
        if target is not None and target not in predictor.class_names:
            raise HTTPException(422, f"unknown class {target!r}; choose one of {', '.join(predictor.class_names)}")
        name = file.filename or "upload"
        try:
            scan = await run_in_threadpool(read_bytes, data, name)
        except ImageReadError as exc:
            raise HTTPException(415, f"{name}: not a readable PNG, JPEG or DICOM image ({exc.cause})") from None
        result = (await run_in_threadpool(predictor.predict_scan, scan, name)).to_dict()
        if heatmap:
            cls = target or result["label"]
            warning = low_probability_warning(cls, result["probabilities"][cls])
            if result["out_of_distribution"]:  # a map of a scan the model does not know explains nothing
                warning = "outside what this model knows: the heat map explains no finding"
            if warning and not force_heatmap:  # no map by default: it would show noise at full brightness
                result["heatmap"] = {"class": cls, "png_base64": None, "warning": warning + "; add force_heatmap=true to see it"}
            else:
                cam, cls = await run_in_threadpool(predictor.explain, scan, target)
                result["heatmap"] = {
                    "class": cls, "png_base64": _overlay_png(scan.pixels, cam), "warning": warning,
                    "map_png_base64": _map_png(cam),  # the map alone (jet, RGBA): the page lays it over the original
                }  # fmt: skip
        if heatmap or preview:
            result["original_png_base64"] = await run_in_threadpool(_gray_png, scan.pixels)  # DICOM too
        return result

    @app.post("/predict_study")
    async def predict_study_endpoint(file: UploadFile = File(...)) -> dict:
        """A CT study: a zip of one DICOM series or a .nii / .nii.gz file -> one patient result, per-slice
        probabilities and a plot of them along the body axis (PNG, base64)."""
        if predictor.task != "ct":
            raise HTTPException(422, f"this model is for {predictor.task}; CT studies need a CT model")
        if pending["n"] >= max_pending:
            raise HTTPException(503, f"busy: {max_pending} predictions already running or waiting", headers={"Retry-After": "5"})
        pending["n"] += 1
        try:
            return await _predict_study(file)
        finally:
            pending["n"] -= 1

    async def _predict_study(file) -> dict:
        from covidscan.data.volume import VolumeError, read_volume_bytes
        from covidscan.study import plot_study, predict_study

        data = await file.read(max_study_bytes + 1)
        if len(data) > max_study_bytes:
            raise HTTPException(413, f"upload larger than the {max_study_bytes} byte limit")
        name = file.filename or "upload"
        try:
            vol = await run_in_threadpool(read_volume_bytes, data, name, max_zip_bytes=3 * max_study_bytes)
            res = await run_in_threadpool(predict_study, predictor, vol)
        except VolumeError as exc:
            raise HTTPException(415, str(exc)) from None
        buf = io.BytesIO()
        await run_in_threadpool(plot_study, res, buf)
        return {**res.to_dict(), "slices": res.slices, "plot_png_base64": base64.b64encode(buf.getvalue()).decode()}

    return app


def _overlay_png(pixels, cam) -> str:
    from PIL import Image

    from covidscan.explain import overlay

    buf = io.BytesIO()
    Image.fromarray(overlay(pixels, cam)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _gray_png(pixels) -> str:
    """The decoded scan as an 8-bit gray PNG at display size (at most DISPLAY_MAX on the longer side)."""
    import numpy as np
    from PIL import Image

    from covidscan.explain import display_size

    g = pixels if pixels.ndim == 2 else pixels.mean(2)
    img = Image.fromarray((np.clip(g, 0, 1) * 255).astype(np.uint8))
    h, w = display_size(*g.shape)
    if (h, w) != g.shape:
        img = img.resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _map_png(cam) -> str:
    import matplotlib
    import numpy as np
    from PIL import Image

    rgba = (matplotlib.colormaps["jet"](cam) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _offline_docs(app) -> None:
    """``/docs`` with Swagger UI's files from the ``swagger-ui-bundle`` package, so it works offline."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="covidscan API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
