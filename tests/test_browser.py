"""The upload page, driven in Debian's headless Chromium by Playwright, against a real server."""

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest


def _chromium() -> str | None:
    """Debian's Chromium; installed with apt-get when missing (as root), so that the README's test
    command passes on a fresh machine by itself (Playwright never downloads a browser here)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            return None
    return shutil.which("chromium")


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained_run):
    import uvicorn

    from covidscan.inference import Predictor
    from covidscan.serve import create_app

    result, data = trained_run
    app = create_app(Predictor.from_checkpoint(result.best_checkpoint, device="cpu"))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}", data
    srv.should_exit = True
    thread.join(timeout=10)


def test_upload_page_shows_probabilities_and_heatmap(server):
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Debian's chromium is not installed and could not be installed (run as root: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    url, data = server
    scan = next((data / "pneumonia").glob("*.png"))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.goto(url + "/")
        assert "Research use only" in page.content()
        page.set_input_files("#file", str(scan))
        page.click("#submit")
        page.wait_for_selector("#status:text('done')", timeout=60_000)
        rows = page.locator("tr.prob-row")
        assert rows.count() == 3
        names = [rows.nth(i).locator("td").first.inner_text() for i in range(3)]
        assert names == ["covid", "pneumonia", "normal"]
        pcts = [float(rows.nth(i).locator("td").nth(1).inner_text().rstrip("%")) for i in range(3)]
        assert abs(sum(pcts) - 100) < 0.5
        assert page.locator("#label").inner_text() in names
        assert page.locator("#cam").is_visible()
        assert page.evaluate("document.getElementById('cam').naturalWidth") > 10
        page.screenshot(path=str(ARTIFACTS / "upload_page.png"), full_page=True)
        # a text file named .png gets a clear error on the page, not a crash
        bad = ARTIFACTS / "not_an_image.png"
        bad.write_text("plain text")
        page.set_input_files("#file", str(bad))
        page.click("#submit")
        page.wait_for_selector("#error:text('error')", timeout=30_000)
        assert "not a readable" in page.locator("#error").inner_text()
        browser.close()
    assert (ARTIFACTS / "upload_page.png").stat().st_size > 5000
