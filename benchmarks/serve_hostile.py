"""Hostile soak of `covidscan serve`: bombs of every format, oversize and lying studies, trickling clients and
bad headers fired at the service while normal clients keep predicting (127.0.0.1 only).

    python benchmarks/serve_hostile.py --checkpoint C --image IMG [--seconds 120] [--normal 2] [--hostile 3]
        [--memory-budget 2048]

The app runs in-process (uvicorn in a thread, with the header-timeout protocol, as `covidscan serve` runs it),
with a token, with ``--max-pending`` lowered to fit ``--memory-budget`` exactly as the CLI does. ``--normal`` clients post
the image back to back; ``--hostile`` clients cycle through the attacks below. Every second the process's
resident memory is sampled. Prints, per attack, the status codes seen; for the normal requests, count, errors
and latency percentiles; and the peak RSS against the start and the stated budget. The reference is the same
app with the normal clients alone, measured first in the same run (their latency without attackers). Then
each attack is sent alone and the rise of resident memory it causes is printed (the issue's goal: under 300 MB).

Attacks: a deflated DICOM whose header says 100 x 100 holding 1 GB of zeros (1 MB on the wire); a DICOM with
ten frames of data for one declared; a 25-megapixel RGB PNG (83 KB); a JPEG of 25 megapixels; a NIfTI whose
header declares 2048 x 2048 x 600 (gzip, a few KB); a zip of three 8000 x 8000 slices; a body trickled a byte
every 3 s; a request with a non-ASCII Authorization header; an upload over the size limit.
"""

from __future__ import annotations

import argparse
import gzip
import io
import socket
import statistics
import struct
import threading
import time
import zipfile
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _dicom(rows: int, cols: int, pixels: bytes, *, deflated: bool = False, frames: int | None = None) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SeriesInstanceUID, ds.InstanceNumber = "1.2.3.4", 1
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def attacks() -> dict[str, tuple[str, bytes, str]]:
    """name -> (endpoint, body, file name)."""
    from PIL import Image

    png, jpg = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (5000, 5000)).save(png, format="PNG")
    Image.new("L", (5000, 5000)).save(jpg, format="JPEG", quality=10)
    hdr = bytearray(348)  # NIfTI-1 header declaring 2048 x 2048 x 600 int16, then no data
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 2048, 2048, 600, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 4, 16)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    hdr[344:348] = b"n+1\0"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(3):
            zf.writestr(f"s{k}.dcm", _dicom(8000, 8000, b"\0" * (8000 * 8000)))
    return {
        "deflated DICOM bomb": ("/predict", _dicom(100, 100, b"\0" * 2**30, deflated=True), "bomb.dcm"),
        "extra frames DICOM": ("/predict", _dicom(100, 100, b"\x80" * 100_000), "frames.dcm"),
        "25 MP RGB PNG": ("/predict", png.getvalue(), "big.png"),
        "25 MP JPEG": ("/predict", jpg.getvalue(), "big.jpg"),
        "NIfTI header bomb": ("/predict_study", gzip.compress(bytes(hdr) + b"\0" * 4), "v.nii.gz"),
        "zip of 8000 px slices": ("/predict_study", zbuf.getvalue(), "s.zip"),
        "over the upload limit": ("/predict", b"\0" * (25 * 2**20), "huge.png"),
    }


def trickle(host: str, port: int, token: str) -> int:
    """A well-formed multipart upload whose file bytes come one every 3 s: the status answered (408 expected)."""
    with socket.create_connection((host, port), timeout=200) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
                  b'--b\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n\r\n')  # fmt: skip
        s.settimeout(3)
        for _ in range(60):
            try:
                head = s.recv(64)
                return int(head.split()[1]) if head else -1
            except TimeoutError:
                s.sendall(b"x")
        return -1


TOKEN = "hostile-soak"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run(base: str, seconds: float, n_normal: int, n_hostile: int, image: bytes, plan: dict) -> dict:
    import httpx

    stop = time.perf_counter() + seconds
    lat, normal_codes, hostile_codes, lock = [], {}, {}, threading.Lock()
    rss = [rss_mb()]
    host, port = base.removeprefix("http://").split(":")

    def normal():
        with httpx.Client(timeout=300) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    code = c.post(base + "/predict", files={"file": ("scan.png", image)}, headers=AUTH).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    normal_codes[code] = normal_codes.get(code, 0) + 1
                    if code == 200:
                        lat.append(time.perf_counter() - t)

    def hostile(k: int):
        names = [*plan, "trickle", "bad Authorization"]
        with httpx.Client(timeout=300) as c:
            i = k
            while time.perf_counter() < stop:
                name = names[i % len(names)]
                i += 1
                try:
                    if name == "trickle":
                        code = trickle(host, int(port), TOKEN)
                    elif name == "bad Authorization":
                        code = c.get(base + "/model", headers=[(b"authorization", b"Bearer \xff\xfe")]).status_code
                    else:
                        path, body, fname = plan[name]
                        code = c.post(base + path, files={"file": (fname, body)}, headers=AUTH).status_code
                except (httpx.HTTPError, OSError):
                    code = -1
                with lock:
                    hostile_codes.setdefault(name, {})
                    hostile_codes[name][code] = hostile_codes[name].get(code, 0) + 1

    threads = [threading.Thread(target=normal) for _ in range(n_normal)]
    threads += [threading.Thread(target=hostile, args=(k,)) for k in range(n_hostile)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(1)
        rss.append(rss_mb())
    q = statistics.quantiles(lat, n=20) if len(lat) >= 20 else [float("nan")] * 19
    return {"normal": normal_codes, "ok": len(lat), "p50": q[9] * 1000, "p95": q[18] * 1000, "hostile": hostile_codes,
            "rss_start": rss[0], "rss_max": max(rss)}  # fmt: skip


def one_at_a_time(base: str, plan: dict) -> dict[str, tuple[int, float]]:
    """Each attack alone, after the reference warmed the service: name -> (status, peak RSS rise in MB above
    the RSS just before it, sampled every 10 ms). Memory freed by one attack and reused by the next hides
    part of the next one's rise, so the rise is a lower bound for attacks after the first large one."""
    import httpx

    out = {}
    for name, (path, body, fname) in plan.items():
        before, peak, done = rss_mb(), [0.0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb())
                time.sleep(0.01)

        th = threading.Thread(target=sample)
        th.start()
        try:
            with httpx.Client(timeout=300) as c:
                code = c.post(base + path, files={"file": (fname, body)}, headers=AUTH).status_code
        except httpx.HTTPError:
            code = -1
        done.set()
        th.join()
        out[name] = (code, max(0.0, peak[0] - before))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--normal", type=int, default=2)
    ap.add_argument("--hostile", type=int, default=3)
    ap.add_argument("--max-pending", type=int, default=8)
    ap.add_argument("--memory-budget", type=int, default=2048, help="MB, as covidscan serve --memory-budget")
    args = ap.parse_args()

    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background
    from covidscan.serve.policy import pending_within_budget
    from covidscan.serve.protocol import header_timeout_protocol

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    pending, why = pending_within_budget(args.max_pending, args.memory_budget, studies=predictor.task == "ct")
    print(why)
    app = create_app(predictor, max_pending=pending, body_timeout=10.0, token=TOKEN)
    image = args.image.read_bytes()
    plan = attacks()  # built before the server starts: the large buffers behind them are freed again
    with serve_in_background(app, http=header_timeout_protocol(10.0)) as base:
        ref = run(base, min(30.0, args.seconds / 4), args.normal, 0, image, {})
        print(f"reference (normal clients alone): {ref['ok']} ok, codes {ref['normal']}, p50 {ref['p50']:.0f} ms, "
              f"p95 {ref['p95']:.0f} ms, RSS {ref['rss_start']:.0f} -> max {ref['rss_max']:.0f} MB")  # fmt: skip
        alone = one_at_a_time(base, plan)
        print("each attack alone (status, peak RSS rise above the RSS before it):")
        for name, (code, rise) in alone.items():
            print(f"  {name}: {code}, +{rise:.0f} MB")
        r = run(base, args.seconds, args.normal, args.hostile, image, plan)
    print(f"under attack, {args.seconds:.0f} s, {args.normal} normal + {args.hostile} hostile clients:")
    print(f"  normal: {r['ok']} ok, codes {r['normal']}, p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms")
    for name, codes in sorted(r["hostile"].items()):
        print(f"  {name}: {dict(sorted(codes.items()))}")
    print(f"  RSS start {r['rss_start']:.0f} MB, max {r['rss_max']:.0f} MB (+{r['rss_max'] - r['rss_start']:.0f} MB; "
          f"budget {args.memory_budget} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
