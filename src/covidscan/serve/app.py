"""FastAPI app factory: nothing loads at import; the caller passes a ready Predictor.

Endpoints: ``POST /predict`` (multipart field ``file``: PNG / JPEG / DICOM, sniffed from
the content, never the name; ``?heatmap=true`` adds a Grad-CAM PNG as base64,
``&target=<class>`` picks its class), ``GET /health``, ``GET /`` (an upload page) and the
OpenAPI schema at ``/openapi.json`` (docs at ``/docs``). Uploads are read into memory up
to ``max_upload_bytes`` (then 413); nothing is written to disk, so requests share no
upload folder. The Predictor serialises forward passes with a lock.
"""

import base64
import html
import io
from importlib.resources import files

from covidscan.data.io import ImageReadError, read_bytes

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes


def create_app(predictor, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD):
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    app = FastAPI(
        title="covidscan",
        version=predictor.meta.versions.get("covidscan", ""),
        description="COVID-19 detection on chest scans. Research use only; not a medical device.",
    )
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
    ) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload larger than the {max_upload_bytes} byte limit")
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
            cam, cls = await run_in_threadpool(predictor.explain, scan, target)
            result["heatmap"] = {"class": cls, "png_base64": _overlay_png(scan.pixels, cam)}
        return result

    return app


def _overlay_png(pixels, cam) -> str:
    from PIL import Image

    from covidscan.explain import overlay

    buf = io.BytesIO()
    Image.fromarray(overlay(pixels, cam)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
