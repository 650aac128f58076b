"""The service's endpoints, on one :class:`fastapi.APIRouter`. What they share (the Predictor, the limits,
the count of predictions in flight) is a :class:`Service` on ``app.state``, reached through dependencies;
admission (503 with Retry-After beyond ``max_pending`` predictions) is one dependency, :func:`admitted`."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

import covidscan.serve.schemas as schemas
from covidscan.data.io import ImageReadError, read_bytes
from covidscan.explain import METHOD_NAMES, low_probability_warning
from covidscan.serve.pngs import gray_png, map_png, overlay_png

router = APIRouter()


@dataclass
class Service:
    """One app's state: the model, its limits and the predictions admitted and not finished (one event loop:
    no lock needed)."""

    predictor: object
    max_upload_bytes: int
    max_study_bytes: int
    max_pending: int
    page: str
    pending: int = 0


def service(request: Request) -> Service:
    return request.app.state.service


async def admitted(svc: Service = Depends(service)):
    """Admission: 503 with Retry-After when ``max_pending`` predictions are already running or waiting."""
    if svc.pending >= svc.max_pending:
        raise HTTPException(503, f"busy: {svc.max_pending} predictions already running or waiting", headers={"Retry-After": "5"})
    svc.pending += 1
    try:
        yield svc
    finally:
        svc.pending -= 1


async def read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than the {limit} byte limit")
    if not data:
        raise HTTPException(400, "empty upload")
    return data


@router.get("/health", response_model=schemas.Health)
def health(svc: Service = Depends(service)) -> dict:
    p = svc.predictor
    return {
        "status": "ok",
        "task": p.task,
        "classes": p.class_names,
        "backbone": p.meta.backbone,
        "weights_source": p.meta.weights_source,
    }


@router.get("/model", response_model=schemas.ModelInfo)
def model_info(svc: Service = Depends(service)) -> dict:
    """What the page shows about the model: task, classes, architecture, weights, training data, validation
    metrics and the calibrated threshold (all from the checkpoint)."""
    m = svc.predictor.meta
    return {
        "task": m.task, "classes": list(m.class_names), "backbone": m.backbone, "head": m.head,
        "description": m.extra.get("description", ""), "weights_source": m.weights_source,
        "image_size": m.preprocess.image_size, "train_counts": m.train_counts, "sources": m.sources,
        "split_protocol": m.split_protocol, "epoch": m.epoch, "val_metrics": m.val_metrics, "threshold": m.threshold,
        "versions": m.versions, "studies": m.task == "ct",
    }  # fmt: skip


@router.get("/", response_class=HTMLResponse)
def index(svc: Service = Depends(service)) -> str:
    # values from the checkpoint are text, never markup: escaped so a class name cannot inject script
    p = svc.predictor
    return svc.page.replace("{{TASK}}", html.escape(p.task)).replace("{{CLASSES}}", html.escape(", ".join(p.class_names)))


@router.post("/predict", response_model=schemas.Prediction)
async def predict(
    file: UploadFile = File(...),
    heatmap: bool = Query(False),
    target: str | None = Query(None, description="class for the heat map (default: predicted)"),
    force_heatmap: bool = Query(
        False, description="draw the heat map even for a class of probability < 0.1 or a scan outside what the model knows"
    ),
    preview: bool = Query(False, description="add the decoded scan as a gray PNG (base64; DICOM previews)"),
    method: str = Query("gradcam", pattern="^(gradcam|gradcam\\+\\+)$", description="heat map method: gradcam or gradcam++"),
    svc: Service = Depends(admitted),
) -> dict:
    p = svc.predictor
    data = await read_upload(file, svc.max_upload_bytes)
    if target is not None and target not in p.class_names:
        raise HTTPException(422, f"unknown class {target!r}; choose one of {', '.join(p.class_names)}")
    name = file.filename or "upload"
    try:
        scan = await run_in_threadpool(read_bytes, data, name)
    except ImageReadError as exc:
        raise HTTPException(415, plain_error(name, exc)) from None
    result = (await run_in_threadpool(p.predict_scan, scan, name)).to_dict()
    if heatmap:
        result["heatmap"] = await _heatmap(p, scan, result, target, force_heatmap, method)
    if heatmap or preview:
        result["original_png_base64"] = await run_in_threadpool(gray_png, scan.pixels)  # DICOM too
    return result


def plain_error(name: str, exc: ImageReadError) -> str:
    """One plain sentence for a file that could not be read (the decoder's own exception names stay in the log)."""
    reason = "" if exc.cause.startswith(("not a readable", "cannot decode")) else f": {exc.cause}"
    return f"{name}: not a readable PNG, JPEG or DICOM image{reason}"


MAX_BATCH = 16  # files in one /predict_batch request


@router.post("/predict_batch", response_model=schemas.Batch)
async def predict_batch(files: list[UploadFile] = File(...), svc: Service = Depends(admitted)) -> dict:
    """Several scans in one request (at most 16, each within the upload limit): one result per file in upload
    order; a file that cannot be read gets ``{"source", "error"}`` and the others are still scored."""
    if len(files) > MAX_BATCH:
        raise HTTPException(413, f"{len(files)} files: at most {MAX_BATCH} per request")
    p, results = svc.predictor, []
    for f in files:
        name = f.filename or "upload"
        data = await f.read(svc.max_upload_bytes + 1)
        if len(data) > svc.max_upload_bytes or not data:
            results.append({"source": name, "error": f"{name}: {'empty' if not data else 'over the upload limit'}"})
            continue
        try:
            scan = await run_in_threadpool(read_bytes, data, name)
        except ImageReadError as exc:
            results.append({"source": name, "error": plain_error(name, exc)})
            continue
        results.append((await run_in_threadpool(p.predict_scan, scan, name)).to_dict())
    return {"results": results}


async def _heatmap(predictor, scan, result: dict, target: str | None, force: bool, method: str = "gradcam") -> dict:
    """Grad-CAM of ``target`` (default: the predicted class), withheld unless ``force`` where it would mislead:
    a class of low probability (its map is mostly noise) or a scan outside what the model knows."""
    cls = target or result["label"]
    warning = low_probability_warning(cls, result["probabilities"][cls])
    if result["out_of_distribution"]:
        warning = "outside what this model knows: the heat map explains no finding"
    name = METHOD_NAMES[method]
    if warning and not force:
        return {"class": cls, "method": name, "png_base64": None, "warning": warning + "; add force_heatmap=true to see it"}
    cam, cls = await run_in_threadpool(predictor.explain, scan, target, method)
    return {
        "class": cls, "method": name, "png_base64": overlay_png(scan.pixels, cam), "warning": warning,
        "map_png_base64": map_png(cam),  # the map alone (jet, RGBA): the page lays it over the original
    }  # fmt: skip


@router.post("/predict_study", response_model=schemas.Study)
async def predict_study_endpoint(
    file: UploadFile = File(...),
    slices: bool = Query(False, description="add every scored slice (lung window, PNG) for review"),
    heatmaps: bool = Query(True, description="with slices: each slice's Grad-CAM map too"),
    svc: Service = Depends(admitted),
) -> dict:
    """A CT study: a zip of one DICOM series or a .nii / .nii.gz file -> one patient result, per-slice
    probabilities and a plot of them along the body axis (PNG, base64); with ``slices=true`` also every scored
    slice as the model saw it, with its probability and heat map (the page's slice viewer)."""
    from covidscan.data.volume import VolumeError, read_volume_bytes
    from covidscan.study import predict_study, slice_views
    from covidscan.study_files import plot_study

    p = svc.predictor
    if p.task != "ct":
        raise HTTPException(422, f"this model is for {p.task}; CT studies need a CT model")
    data = await read_upload(file, svc.max_study_bytes)
    name = file.filename or "upload"
    try:
        vol = await run_in_threadpool(read_volume_bytes, data, name, max_zip_bytes=3 * svc.max_study_bytes)
        res = await run_in_threadpool(predict_study, p, vol)
    except VolumeError as exc:
        raise HTTPException(415, str(exc)) from None
    buf = io.BytesIO()
    await run_in_threadpool(plot_study, res, buf)
    out = {**res.to_dict(), "slices": res.slices, "plot_png_base64": base64.b64encode(buf.getvalue()).decode()}
    if slices:
        views = await run_in_threadpool(slice_views, p, res, vol, heatmaps=heatmaps)
        out["slice_views"] = [
            {"index": v["index"], "position_mm": v["position_mm"], "probability": v["probability"],
             "png_base64": gray_png(v["image"]), **({"map_png_base64": map_png(v["cam"])} if "cam" in v else {})}
            for v in views
        ]  # fmt: skip
    return out
