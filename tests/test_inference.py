import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from covidscan.cli import main
from covidscan.data import read_image
from covidscan.data.transforms import Preprocess, to_gray_uint8, to_input
from covidscan.explain import grad_cam
from covidscan.inference import Predictor
from covidscan.models import build_model, list_backbones
from tests.conftest import chest_like, write_dicom


@pytest.fixture(scope="module")
def predictor(trained_run):
    result, _ = trained_run
    return Predictor.from_checkpoint(result.best_checkpoint, device="cpu")


def test_predict_equals_model_forward(predictor, trained_run):
    _, data = trained_run
    path = next((data / "covid").glob("*.png"))
    pred = predictor.predict(path)
    pre = Preprocess.from_dict(predictor.meta["preprocess"])
    x = to_input(to_gray_uint8(read_image(path), pre.image_size), pre)[None]
    with torch.no_grad():
        ref = predictor.model(x).softmax(1)[0].numpy()
    np.testing.assert_allclose([pred.probabilities[n] for n in predictor.class_names], ref, atol=1e-6)
    assert pred.label == predictor.class_names[int(ref.argmax())]
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5
    assert pred.warnings == []


def test_channels_last_and_onnxruntime_backends_give_the_checkpoints_probabilities(trained_run, tmp_path, capsys):
    """The Predictor's speed options change no output: channels_last against the checkpoint's model in NCHW,
    the onnxruntime backend against the torch one (TTA too), and on the command line."""
    from covidscan.checkpoint import load_checkpoint, model_from_checkpoint

    result, data = trained_run
    paths = sorted((data / "pneumonia").glob("*.png"))[:3]
    model, meta = model_from_checkpoint(load_checkpoint(result.best_checkpoint))
    ref = Predictor(model, meta)
    assert ref.model.backbone.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain, _ = model_from_checkpoint(load_checkpoint(result.best_checkpoint))  # NCHW, as trained
    x = torch.cat([ref.tensor(read_image(p)) for p in paths])
    with torch.no_grad():
        nchw = plain.eval()(x).softmax(1).numpy()
    np.testing.assert_allclose(ref.probabilities(x), nchw, atol=1e-5)
    ort = Predictor.from_checkpoint(result.best_checkpoint, backend="onnxruntime", tta=True)
    ref.tta = True
    np.testing.assert_allclose(ort.probabilities(x), ref.probabilities(x), atol=1e-5)
    assert ort.predict(paths[0]).label == ref.predict(paths[0]).label
    assert (
        main(["predict", "--checkpoint", str(result.best_checkpoint), str(paths[0]), "--json", "--backend", "onnxruntime"]) == 0
    )
    got = json.loads(capsys.readouterr().out)[0]["probabilities"]
    ref.tta = False
    want = ref.predict(paths[0]).probabilities
    assert all(abs(got[k] - want[k]) < 1e-5 for k in want)


def test_warnings_for_unlike_inputs(predictor, tmp_path):
    rng = np.random.default_rng(0)
    photo = (rng.uniform(size=(48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo, mode="RGB").save(tmp_path / "photo.png")
    assert any("colour" in w for w in predictor.predict(tmp_path / "photo.png").warnings)
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(tmp_path / "flat.png")
    assert any("uniform" in w for w in predictor.predict(tmp_path / "flat.png").warnings)
    inverted = ((1 - chest_like(48, 1)) * 255).astype(np.uint8)  # bright lungs on dark: unlike every training scan
    Image.fromarray(inverted).save(tmp_path / "inverted.png")
    assert any("does not look like" in w for w in predictor.predict(tmp_path / "inverted.png").warnings)


def test_cli_predict_formats_and_bad_file(trained_run, tmp_path, capsys):
    result, data = trained_run
    (tmp_path / "in").mkdir()
    good = sorted((data / "normal").glob("*.png"))[:2]
    for g in good:
        (tmp_path / "in" / g.name).write_bytes(g.read_bytes())
    (tmp_path / "in" / "broken.png").write_text("not an image")
    write_dicom(tmp_path / "in" / "scan.dcm", (chest_like(48, 3) * 4000).astype(np.uint16), photometric="MONOCHROME1")
    rc = main(["predict", "--checkpoint", str(result.best_checkpoint), str(tmp_path / "in"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 1  # one file failed
    rows = json.loads(out)
    ok = [r for r in rows if "error" not in r]
    assert len(ok) == 3 and {r["source"].split("/")[-1] for r in ok} == {g.name for g in good} | {"scan.dcm"}
    (bad,) = [r for r in rows if "error" in r]  # the bad file keeps its row, with the reason; the others go on
    assert bad["source"].endswith("broken.png") and "not a readable image" in bad["error"]
    assert sum("broken.png" in line for line in err.splitlines() if "error" in line) == 1
    rc = main(["predict", "--checkpoint", str(result.best_checkpoint), str(good[0]), "--csv"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("file,label,covid,pneumonia,normal") and len(lines) == 2


@pytest.mark.parametrize("backbone", list_backbones())
def test_grad_cam_every_backbone(backbone):
    torch.manual_seed(0)
    model, _ = build_model(backbone, "linear", 3)
    model.eval()
    size = 96 if backbone == "inception_v3" else 64
    x = torch.randn(1, 3, size, size)
    cams = [grad_cam(model, x, k, size=(50, 70))[0] for k in range(3)]
    for cam in cams:
        assert cam.shape == (50, 70) and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert not np.allclose(cams[0], cams[1]) or not np.allclose(cams[1], cams[2])
    # only the hooked activation's gradient is computed: no weight gradient is allocated or kept (the service's
    # memory rose with every heat map while backward() filled one .grad per weight)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():  # frozen weights still give a map
        p.requires_grad_(False)
    cam, _ = grad_cam(model, x, 0, size=(50, 70))
    np.testing.assert_allclose(cam, cams[0], atol=1e-5)


def test_grad_cam_plus_plus():
    """Grad-CAM++: with one channel it draws the same (normalised) map as Grad-CAM; with several it weighs
    channels differently; an unknown method is refused."""
    from torch import nn

    class Tiny(nn.Module):  # a conv layer (hooked) and a linear read-out of its channel means
        def __init__(self, c):
            super().__init__()
            self.spec = type("S", (), {"cam_layer": "conv", "name": "tiny"})()
            self.conv = nn.Conv2d(3, c, 3, padding=1)
            self.fc = nn.Linear(c, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    one = Tiny(1)
    with torch.no_grad():
        one.fc.weight.fill_(1.0)
    a, _ = grad_cam(one, x, 0)
    b, _ = grad_cam(one, x, 0, method="gradcam++")
    np.testing.assert_allclose(a, b, atol=1e-5)
    many = Tiny(6)
    a, _ = grad_cam(many, x, 0)
    b, _ = grad_cam(many, x, 0, method="gradcam++")
    assert b.min() >= 0 and b.max() <= 1 and not np.allclose(a, b, atol=1e-3)
    with pytest.raises(ValueError, match="gradcam"):
        grad_cam(many, x, 0, method="scorecam")


def test_explain_cli(trained_run, tmp_path, capsys):
    result, data = trained_run
    img = next((data / "covid").glob("*.png"))
    assert (
        main(
            [
                "explain",
                "--checkpoint",
                str(result.best_checkpoint),
                str(img),
                "--out",
                str(tmp_path / "cam.png"),
                "--class",
                "normal",
            ]
        )
        == 0
    )
    assert "Grad-CAM for normal" in capsys.readouterr().out
    assert Image.open(tmp_path / "cam.png").size[0] > 100
    assert (
        main(
            ["explain", "--checkpoint", str(result.best_checkpoint), str(img), "--out", str(tmp_path / "c.png"), "--class", "flu"]
        )
        == 2
    )


@pytest.fixture(scope="module")
def client(predictor):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app

    return TestClient(create_app(predictor, max_upload_bytes=200_000))


def _png_bytes(seed=0) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray((chest_like(48, seed) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_api_predict_health_openapi(client, predictor):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["classes"] == predictor.class_names
    r = client.post("/predict?heatmap=true&target=covid", files={"file": ("scan.png", _png_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["probabilities"]) == set(predictor.class_names)
    assert body["heatmap"]["class"] == "covid" and len(body["heatmap"]["png_base64"]) > 100
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert "Research use only" in client.get("/").text


def test_api_rejects_bad_uploads(client):
    r = client.post("/predict", files={"file": ("x.png", b"hello, I am text" * 10, "image/png")})
    assert r.status_code == 415 and "x.png" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("big.png", b"\0" * 300_000, "image/png")})
    assert r.status_code == 413
    r = client.post("/predict", files={"file": ("e.png", b"", "image/png")})
    assert r.status_code == 400
    r = client.post("/predict?target=flu", files={"file": ("s.png", _png_bytes(), "image/png")})
    assert r.status_code == 422


def test_api_dicom_upload(client, tmp_path):
    path = write_dicom(tmp_path / "u.bin", (chest_like(48, 5) * 3000).astype(np.uint16))
    r = client.post("/predict", files={"file": ("scan.png", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text


def test_api_concurrent_uploads_match_sequential(client, predictor):
    payloads = [_png_bytes(seed) for seed in range(8)]
    expected = [predictor.predict_bytes(p).probabilities for p in payloads]

    def call(i):
        return client.post("/predict", files={"file": (f"{i}.png", payloads[i], "image/png")}).json()["probabilities"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(call, range(8)))
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-6)


@pytest.mark.parametrize("backbone", list_backbones())
def test_onnx_parity_every_backbone(backbone, tmp_path):
    from covidscan.export import export_onnx

    torch.manual_seed(0)
    model, _ = build_model(backbone, "paper", 3)
    size = 96 if backbone == "inception_v3" else 64
    meta = {
        "class_names": ["covid", "pneumonia", "normal"],
        "preprocess": {"image_size": size},
        "task": "xray",
        "backbone": backbone,
    }
    diff = export_onnx(model, meta, tmp_path / "m.onnx")
    assert diff <= 1e-4 and (tmp_path / "m.onnx").stat().st_size > 10_000


def test_export_cli(trained_run, tmp_path, capsys):
    result, _ = trained_run
    assert main(["export", "--checkpoint", str(result.best_checkpoint), "--onnx", str(tmp_path / "m.onnx")]) == 0
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["covidscan_class_names"]) == ["covid", "pneumonia", "normal"]


def test_heat_map_of_a_large_scan_is_bounded(predictor, client):
    from covidscan.data.io import ScanImage
    from covidscan.explain import DISPLAY_MAX, overlay

    big = ScanImage(np.tile(chest_like(300, 2), (10, 7)).astype(np.float32), "PNG", "L", "big.png")  # 3000 x 2100
    cam, _ = predictor.explain(big)
    assert max(cam.shape) == DISPLAY_MAX and cam.shape == (1024, 717)
    assert overlay(big.pixels, cam).shape == (1024, 717, 3)
    import io

    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")
    r = client.post("/predict?heatmap=true", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert r.status_code == 415 and "too large" in r.json()["detail"]


def test_body_limit_is_enforced_while_reading(predictor):
    import asyncio

    from covidscan.serve.middleware import BodyLimit

    received = []

    async def app(scope, receive, send):  # reads the whole body, like a form parser spooling it
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            received.append(len(msg.get("body", b"")))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(headers, chunks):
        sent, queue = [], [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0) if queue else {"type": "http.disconnect"}

        async def send(msg):
            sent.append(msg)

        received.clear()
        asyncio.run(BodyLimit(app, 1000)({"type": "http", "headers": headers}, receive, send))
        return [m["status"] for m in sent if m["type"] == "http.response.start"], sum(received)

    assert run([], [b"x" * 300] * 3) == ([200], 900)
    status, read = run([], [b"x" * 300] * 100)  # chunked, no Content-Length: cut off at the limit
    assert status == [413] and read <= 1000
    assert run([(b"content-length", b"30000")], [b"x" * 300] * 100) == ([413], 0)  # never read at all


def test_stalled_upload_gets_408_and_frees_the_app():
    import asyncio
    import time

    from covidscan.serve.middleware import StallGuard

    seen = {"chunks": 0, "disconnect": False}

    async def app(scope, receive, send):  # reads the body until it ends or the client is gone
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                seen["disconnect"] = True
                return
            seen["chunks"] += 1
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(stall: bool):
        sent, n = [], {"i": 0}

        async def receive():  # one chunk, then (stall) nothing ever again
            n["i"] += 1
            if n["i"] == 1:
                return {"type": "http.request", "body": b"x" * 10, "more_body": stall}
            await asyncio.sleep(3600)

        async def send(msg):
            sent.append(msg)

        t = time.perf_counter()
        asyncio.run(StallGuard(app, 0.2)({"type": "http", "headers": []}, receive, send))
        return [m["status"] for m in sent if m["type"] == "http.response.start"], time.perf_counter() - t

    assert run(stall=False)[0] == [200]
    status, took = run(stall=True)
    assert status == [408] and took < 5 and seen["disconnect"]


def test_oversize_upload_through_the_app(predictor):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app

    client = TestClient(create_app(predictor, max_upload_bytes=100_000))

    def chunks():
        for _ in range(50):
            yield b"\0" * 10_000

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_token_busy_and_host_guards(predictor, trained_run, capsys):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app

    client = TestClient(create_app(predictor, token="s3cret"))
    assert client.get("/health").status_code == 200  # health stays open for monitors
    assert client.get("/").status_code == 401
    png = _png_bytes(1)
    assert client.post("/predict", files={"file": ("s.png", png, "image/png")}).status_code == 401
    ok = client.post("/predict", files={"file": ("s.png", png, "image/png")}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and client.get("/?token=s3cret").status_code == 200
    app = create_app(predictor, max_pending=1)
    app.state.service.pending = 1  # one prediction already running
    r = TestClient(app).post("/predict", files={"file": ("s.png", png, "image/png")})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    app.state.service.pending = 0
    assert TestClient(app).post("/predict", files={"file": ("s.png", png, "image/png")}).status_code == 200
    with pytest.raises(ValueError, match="max_pending=0"):
        create_app(predictor, max_pending=0)
    result, _ = trained_run
    assert main(["serve", "--checkpoint", str(result.best_checkpoint), "--host", "0.0.0.0"]) == 2
    assert "set a token" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(result.best_checkpoint), "--max-upload-mb", "-1"]) == 2


def test_heat_map_of_an_improbable_class_is_withheld_with_a_warning(client, predictor):
    png = _png_bytes(3)
    probs = predictor.predict_bytes(png).probabilities
    low = min(probs, key=probs.get)
    r = client.post(f"/predict?heatmap=true&target={low}", files={"file": ("s.png", png, "image/png")}).json()
    if probs[low] < 0.1:
        assert r["heatmap"]["png_base64"] is None and "noise" in r["heatmap"]["warning"]
        forced = client.post(
            f"/predict?heatmap=true&target={low}&force_heatmap=true", files={"file": ("s.png", png, "image/png")}
        )
        assert len(forced.json()["heatmap"]["png_base64"]) > 100 and forced.json()["heatmap"]["warning"]
    else:
        assert r["heatmap"]["png_base64"] and r["heatmap"]["warning"] is None
    from covidscan.explain import low_probability_warning

    assert low_probability_warning("covid", 0.05) and low_probability_warning("covid", 0.5) is None


def test_api_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()  # nothing loaded from a content-delivery network
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert b'"5.' in js.content[:2000] or b"5.32" in js.content  # Swagger UI 5: reads OpenAPI 3.1
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/docs-assets/redoc.standalone.js" in redoc.text and "fonts.googleapis" not in redoc.text
    assert client.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_silent_and_partial_header_connections_are_closed(predictor):
    import socket
    import time
    from urllib.parse import urlparse

    import httpx

    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background
    from covidscan.serve.protocol import header_timeout_protocol

    with serve_in_background(create_app(predictor), http=header_timeout_protocol(0.5)) as base:
        port = urlparse(base).port
        silent = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        for sock in (silent, partial):
            sock.settimeout(10)
            t = time.time()
            assert sock.recv(100) == b"" and time.time() - t < 5  # closed by the server, not by our timeout
            sock.close()
        with httpx.Client() as c:  # a normal client on a kept-alive connection is unaffected
            assert c.get(f"{base}/health").status_code == 200
            time.sleep(0.8)
            assert c.get(f"{base}/health").status_code == 200
