"""Screenshots of the upload page (desktop and phone width) with a real model on real scans, for docs/screenshots.

python tools/page_screenshots.py CHECKPOINT SCAN1 SCAN2 SCAN3   (needs Debian chromium and playwright)
"""

import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from covidscan.inference import Predictor
from covidscan.serve import create_app

pred = Predictor.from_checkpoint(sys.argv[1], device="cpu")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
srv = uvicorn.Server(uvicorn.Config(create_app(pred), host="127.0.0.1", port=port, log_level="warning"))
threading.Thread(target=srv.run, daemon=True).start()
while not srv.started:
    time.sleep(0.05)
files = sys.argv[2:5]
out = Path("docs/screenshots")
out.mkdir(parents=True, exist_ok=True)
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox", "--disable-gpu"])
    for name, vp, fs in (
        ("page_desktop", {"width": 1100, "height": 900}, files),
        ("page_mobile", {"width": 390, "height": 844}, files[:1]),
    ):
        pg = b.new_page(viewport=vp)
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.click("details#model summary")
        pg.set_input_files("#file", fs)
        pg.click("#submit")
        pg.wait_for_selector("#status:text('done')", timeout=120_000)
        pg.screenshot(path=str(out / f"{name}.png"), full_page=True)
        from PIL import Image

        Image.open(out / f"{name}.png").convert("RGB").save(out / f"{name}.jpg", quality=80, optimize=True)
        (out / f"{name}.png").unlink()
    b.close()
srv.should_exit = True
print("ok")
