"""The upload page, driven in Debian's headless Chromium by Playwright, against a real server."""

import base64
import json
import os
import shutil
import subprocess
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


@pytest.fixture
def server(trained_run):
    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background

    result, data = trained_run
    with serve_in_background(create_app(Predictor.from_checkpoint(result.best_checkpoint, device="cpu"))) as url:
        yield url, data


def test_upload_page_shows_probabilities_and_heatmap(server):
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Debian's chromium is not installed and could not be installed (run as root: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    url, data = server
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
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        assert "Research use only" in page.content()
        # model information from GET /model
        page.click("details#model summary")
        page.wait_for_selector("#model-info dt", timeout=30_000)
        info = page.locator("#model-info").inner_text()
        assert "efficientnet_lite0" in info and "weights" in info and "training images" in info
        # several files at once through the picker: one card each, original and heat map side by side
        scans = sorted((data / "pneumonia").glob("*.png"))[:2]
        page.set_input_files("#file", [str(f) for f in scans])
        page.click("#submit")
        page.wait_for_selector("#status:text('done')", timeout=90_000)
        cards = page.locator(".card.result")
        assert cards.count() == 2
        for i in range(2):
            rows = cards.nth(i).locator("tr.prob-row")
            assert [rows.nth(k).locator("td").first.inner_text() for k in range(3)] == ["covid", "pneumonia", "normal"]
            pcts = [float(rows.nth(k).locator("td").nth(1).inner_text().rstrip("%")) for k in range(3)]
            assert abs(sum(pcts) - 100) < 0.5
            assert cards.nth(i).locator("img.original").is_visible() and cards.nth(i).locator(".colorbar").is_visible()
            assert page.evaluate(f"document.querySelectorAll('.card.result img.cam')[{i}].naturalWidth") > 10
        # the opacity slider changes the map's opacity
        cards.nth(0).locator("input.opacity").fill("90")
        assert float(cards.nth(0).locator("img.cam").evaluate("e => e.style.opacity")) == 0.9
        page.screenshot(path=str(ARTIFACTS / "upload_page.png"), full_page=True)
        # drag and drop: a DataTransfer holding a file dropped on the drop zone
        b64 = base64.b64encode(scans[0].read_bytes()).decode()
        page.evaluate(
            """b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                 const dt = new DataTransfer(); dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                 document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true })); }""",
            b64,
        )
        page.locator(".card.result").nth(2).wait_for(timeout=60_000)
        assert page.locator(".card.result h3").last.inner_text() == "dropped.png"  # cards in upload order
        assert [cards.nth(k).locator("h3").inner_text() for k in range(2)] == [f.name for f in scans]
        # a text file named .png: a failed card in plain words, not a crash; the others stay
        bad = ARTIFACTS / "not_an_image.png"
        bad.write_text("plain text")
        page.set_input_files("#file", str(bad))
        page.click("#submit")
        page.wait_for_selector(".card.failed", timeout=30_000)
        failed_text = page.locator(".card.failed").inner_text()
        assert "not a readable" in failed_text and "BytesIO" not in page.content() and "Error:" not in failed_text
        assert page.content().count("not a readable") == 1  # one plain error, in its card
        # the heat map's class and method are the user's choice
        page.select_option("#cam-method", "gradcam++")
        page.select_option("#cam-class", "normal")
        page.set_input_files("#file", str(scans[0]))
        page.click("#submit")
        page.locator(".card.result").nth(3).wait_for(timeout=60_000)
        caption = page.locator(".card.result").last.inner_text()
        assert "Grad-CAM++ for normal" in caption or "heat map:" in caption  # drawn, or withheld with its reason
        page.select_option("#cam-method", "gradcam")
        page.select_option("#cam-class", "")
        assert page.locator(".card.result").count() == 4
        # results download as JSON (and CSV)
        with page.expect_download() as dl:
            page.click("#dl-json")
        rows = json.loads(Path(dl.value.path()).read_text())
        assert len(rows) == 5 and sum("error" in r for r in rows) == 1 and rows[0]["label"] in ("covid", "pneumonia", "normal")
        with page.expect_download() as dl:
            page.click("#dl-csv")
        assert Path(dl.value.path()).read_text().splitlines()[0].startswith('"file","label","covid"')
        # a phone-width viewport lays out at its own width
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url + "/")
        phone.set_input_files("#file", str(scans[1]))
        phone.click("#submit")
        phone.wait_for_selector("#status:text('done')", timeout=60_000)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        bars = phone.evaluate("Math.max(...[...document.querySelectorAll('.bar')].map(b => b.getBoundingClientRect().right))")
        assert bars <= 390  # the probability bars stay inside the card
        phone.screenshot(path=str(ARTIFACTS / "upload_page_mobile.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "upload_page.png").stat().st_size > 5000 and (ARTIFACTS / "upload_page_mobile.png").stat().st_size > 5000


def test_api_docs_render_the_predict_operation(server):
    """/docs renders the OpenAPI 3.1 schema (Swagger UI 5, served offline) and /redoc too."""
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Debian's chromium is not installed and could not be installed (run as root: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert any(t.strip() == "/predict" for t in paths) and "Unable to render" not in page.content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "docs.png"))
        page.goto(url + "/redoc")
        page.wait_for_selector("text=/predict", timeout=30_000)
        browser.close()


def test_report_html_fits_a_phone(trained_run, tmp_path):
    """report.html at 390 px: wide tables scroll inside their box; the page itself never scrolls sideways."""
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Debian's chromium is not installed and could not be installed (run as root: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from covidscan.evaluation import evaluate

    result, data = trained_run
    evaluate(result.best_checkpoint, data, out=tmp_path / "ev", n_boot=20, by=("source",))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto((tmp_path / "ev" / "report.html").as_uri())
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert (
            page.evaluate("Math.max(...[...document.querySelectorAll('.scroll')].map(d => d.scrollWidth))") > 390
        )  # wide tables scroll
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report_mobile.png"), full_page=True)
        browser.close()


def test_ct_study_card_has_a_slice_viewer(tmp_path):
    """A CT model's page: a zipped series uploaded gives a study card whose slider walks the lung slices, each with
    its probability and heat map, and whose buttons jump to the highest-scoring ones."""
    chromium = _chromium()
    if chromium is None:
        pytest.fail("Debian's chromium is not installed and could not be installed (run as root: apt-get install -y chromium)")
    import io
    import zipfile

    from playwright.sync_api import sync_playwright

    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background
    from covidscan.training import train
    from tests.conftest import make_folder_dataset, tiny_config
    from tests.test_volumes import phantom, write_series

    data = make_folder_dataset(tmp_path / "ct", classes=("covid", "normal"), per_class=6, size=48)
    ckpt = train(tiny_config(data={"task": "ct"}, train={"epochs": 1}), data, tmp_path / "run").best_checkpoint
    write_series(tmp_path / "s", phantom(7, size=64))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            zf.write(f, f.name)
    (tmp_path / "study.zip").write_bytes(buf.getvalue())
    with serve_in_background(create_app(Predictor.from_checkpoint(ckpt, device="cpu"))) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url + "/")
        page.set_input_files("#file", str(tmp_path / "study.zip"))
        page.click("#submit")
        page.wait_for_selector(".card.study .viewer", timeout=90_000)
        label = page.locator(".viewer .slice-label")
        first = label.inner_text()
        assert "p(covid) =" in first and "of 7 lung slices" in first
        page.locator(".viewer .slice-slider").fill("0")
        assert label.inner_text() != first or first.endswith("1 of 7 lung slices")
        assert page.locator(".viewer .jumps button").count() == 5
        page.locator(".viewer .jumps button").nth(1).click()
        assert page.evaluate("document.querySelector('.viewer img.cam').naturalWidth") > 10
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "page_ct_study.png"), full_page=True)
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url + "/")
        phone.set_input_files("#file", str(tmp_path / "study.zip"))
        phone.click("#submit")
        phone.wait_for_selector(".card.study .viewer", timeout=90_000)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390
        browser.close()
