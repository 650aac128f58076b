"""The service's remaining doors: token forms, Host header, security headers, trickled bodies, the access log."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest


@pytest.fixture(scope="module")
def predictor(trained_run):
    from covidscan.inference import Predictor

    return Predictor.from_checkpoint(trained_run[0].best_checkpoint, device="cpu")


def test_token_from_header_or_cookie_never_500_on_odd_headers(predictor):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app

    client = TestClient(create_app(predictor, token="s3cret"))
    assert client.get("/health").status_code == 200  # the one open path
    assert client.get("/model").status_code == 401
    assert client.get("/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # a non-ASCII byte, another scheme, an empty value: 400, never a 500 with a traceback
    for bad in (b"Bearer s3cr\xe9t", b"Basic czNjcmV0", b"Bearer "):
        r = client.get("/model", headers=[(b"authorization", bad)])
        assert r.status_code == 400 and "malformed Authorization" in r.json()["detail"]
    # the page opened as /?token=T sets a cookie; later requests carry the cookie, not the token in a URL
    page = client.get("/?token=s3cret")
    assert page.status_code == 200 and "covidscan_token=s3cret" in page.headers["set-cookie"]
    assert "HttpOnly" in page.headers["set-cookie"] and "SameSite=Strict" in page.headers["set-cookie"]
    assert client.get("/model").status_code == 200  # the cookie, kept by the client
    fresh = TestClient(create_app(predictor, token="s3cret"))
    assert fresh.get("/model?token=s3cret").status_code == 401  # a query token only opens the page


def test_host_allow_list_stops_dns_rebinding(predictor):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app
    from covidscan.serve.policy import check_exposure

    hosts = check_exposure("127.0.0.1", None)  # the token-less local default
    assert "localhost" in hosts and check_exposure("127.0.0.1", "t") is None
    app = create_app(predictor, allowed_hosts=hosts)
    assert TestClient(app, base_url="http://localhost:8000").get("/model").status_code == 200
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/model").status_code == 200
    r = TestClient(app, base_url="http://attacker.example:8000").get("/model")
    assert r.status_code == 421 and "attacker.example" in r.json()["detail"]


def test_security_headers_on_every_response(predictor):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app

    client = TestClient(create_app(predictor))
    for path in ("/", "/model", "/docs", "/openapi.json", "/nowhere"):
        h = client.get(path).headers
        assert h["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in h["content-security-policy"], path
        assert h["x-frame-options"] == "DENY" and h["referrer-policy"] == "no-referrer", path


def test_a_trickled_body_is_cut_off_by_the_total_time_limit():
    from covidscan.serve.middleware import StallGuard

    seen = {"chunks": 0}

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            seen["chunks"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent = []

    async def receive():  # one byte every 0.1 s, for ever: never a stall of 0.3 s
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(msg):
        sent.append(msg)

    t = time.perf_counter()
    asyncio.run(StallGuard(app, 0.3, total=1.0)({"type": "http", "headers": []}, receive, send))
    took = time.perf_counter() - t
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [408]
    assert 0.9 < took < 3 and 5 <= seen["chunks"] <= 12


def test_access_log_never_shows_a_token():
    from covidscan.serve.middleware import QuerylessAccessLog

    rec = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                            ("127.0.0.1:5000", "GET", "/?token=s3cret", "1.1", 200), None)  # fmt: skip
    assert QuerylessAccessLog().filter(rec) and "s3cret" not in rec.getMessage() and '"GET / HTTP/1.1" 200' in rec.getMessage()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-pending", "0"], "--max-pending 0: at least 1"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0"),
        (["--host", "0.0.0.0"], "set a token"),
    ],
)
def test_serve_refuses_settings_that_refuse_everything_or_expose_it(trained_run, capsys, args, message):
    from covidscan.cli import main

    assert main(["serve", "--checkpoint", str(trained_run[0].best_checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_typed_responses_and_a_batch_endpoint(predictor, trained_run):
    from fastapi.testclient import TestClient

    from covidscan.serve import create_app

    client = TestClient(create_app(predictor))
    schema = client.get("/openapi.json").json()
    ok = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Prediction"}  # typed, not an untyped object
    for name in ("Prediction", "Study", "Batch", "ModelInfo", "Health", "Heatmap", "Decision"):
        assert name in schema["components"]["schemas"], name
    assert "out_of_distribution" in schema["components"]["schemas"]["Prediction"]["required"]
    _, data = trained_run
    good = sorted((data / "normal").glob("*.png"))[:2]
    files = [("files", (good[0].name, good[0].read_bytes(), "image/png")), ("files", ("bad.png", b"not an image", "image/png")),
             ("files", (good[1].name, good[1].read_bytes(), "image/png"))]  # fmt: skip
    r = client.post("/predict_batch", files=files)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["source"] for x in res] == [good[0].name, "bad.png", good[1].name]
    assert "error" in res[1] and "not a readable" in res[1]["error"] and "Error" not in res[1]["error"]
    single = client.post("/predict", files={"file": (good[0].name, good[0].read_bytes(), "image/png")}).json()
    assert res[0]["probabilities"] == pytest.approx(single["probabilities"])
    too_many = [("files", (f"{k}.png", good[0].read_bytes(), "image/png")) for k in range(17)]
    assert client.post("/predict_batch", files=too_many).status_code == 413
