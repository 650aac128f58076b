"""The GPU script of the paper's whole protocol, rehearsed on CPU with tiny settings, so that the one
call on a lent GPU cannot fail on a path or an argument."""

import os
import subprocess
from pathlib import Path

from tests.conftest import make_folder_dataset

REPO = Path(__file__).resolve().parents[1]


def test_paper_protocol_script_smoke(tmp_path):
    make_folder_dataset(tmp_path / "data" / "xray", per_class=10, size=40, groups_per_class=10)
    make_folder_dataset(tmp_path / "data" / "ct", classes=("covid", "normal"), per_class=8, size=40, groups_per_class=8)
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "DATA_ROOT": str(tmp_path / "data"), "OUT": str(out), "WORK": str(tmp_path / "work")}
    proc = subprocess.run(
        ["bash", "benchmarks/device/paper_protocol.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for task in ("xray", "ct"):
        table = (out / f"reproduce_{task}.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("| ") and "(" in line.split("|")[1]]
        assert len(rows) == 6, table  # 3 models x 2 protocols
        assert "peak GPU MiB" in table and "s / epoch" in table
    machine = (out / "machine.txt").read_text()
    assert "six paper runs x 2 protocols" in machine and "phase ended" not in machine, machine
    assert "RATIO" in (out / "throughput.txt").read_text()
    assert (out / "paper_protocol_runs.tgz").stat().st_size > 1000
