"""Screenshots of the upload page (desktop and phone width) with a real model on real scans, for docs/screenshots.

python tools/page_screenshots.py CHECKPOINT SCAN1 SCAN2 SCAN3   (needs Debian chromium and playwright)
"""

import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from covidscan.inference import Predictor
from covidscan.serve import create_app
from covidscan.serve.background import serve_in_background


def main() -> None:
    pred = Predictor.from_checkpoint(sys.argv[1], device="cpu")
    files = sys.argv[2:5]
    out = Path("docs/screenshots")
    out.mkdir(parents=True, exist_ok=True)
    with serve_in_background(create_app(pred)) as base, sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"])
        for name, vp, fs in (
            ("page_desktop", {"width": 1100, "height": 900}, files),
            ("page_mobile", {"width": 390, "height": 844}, files[:1]),
        ):
            pg = b.new_page(viewport=vp)
            pg.goto(base + "/")
            pg.click("details#model summary")
            pg.set_input_files("#file", fs)
            pg.click("#submit")
            pg.wait_for_selector("#status:text('done')", timeout=120_000)
            pg.screenshot(path=str(out / f"{name}.png"), full_page=True)
            Image.open(out / f"{name}.png").convert("RGB").save(out / f"{name}.jpg", quality=80, optimize=True)
            (out / f"{name}.png").unlink()
        b.close()
    print(f"wrote {out}/page_desktop.jpg and page_mobile.jpg")


if __name__ == "__main__":
    main()
