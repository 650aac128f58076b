"""Write a compact copy of a dataset for a remote GPU machine: every image already
resized to S x S gray (exactly covidscan's ``to_gray_uint8``), saved as JPEG quality 95,
with the manifest rows (labels, groups, sources) unchanged and in the same order, so
splits made from the copy equal splits made from the original.

    python tools/pack_dataset.py ../shared/data/xray .gpu/data/xray --size 224
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image

from covidscan.data import load_dataset, read_image
from covidscan.data.transforms import to_gray_uint8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quality", type=int, default=95)
    args = ap.parse_args()
    index = load_dataset(args.data)
    rows = []
    for rec in index.records:
        rel = Path(rec.label) / (rec.path.stem + ".jpg")
        (args.out / rel).parent.mkdir(parents=True, exist_ok=True)
        arr = to_gray_uint8(read_image(rec.path), args.size)[0].numpy()
        Image.fromarray(arr, mode="L").save(args.out / rel, quality=args.quality)
        row = dict(rec.row) if rec.row else {}
        row.update(
            file=str(rel), label=rec.label, group_id=rec.group_id or "", patient_id=rec.patient_id or "", source=rec.source
        )
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(f"packed {len(rows)} images into {args.out}")


if __name__ == "__main__":
    main()
