"""The GPU script of the paper's whole protocol, rehearsed on CPU with tiny settings, so that the one
call on a lent GPU cannot fail on a path or an argument."""

import importlib.util
import lzma
import os
import subprocess
from pathlib import Path

import torch
import torchvision

from tests.conftest import make_folder_dataset

REPO = Path(__file__).resolve().parents[1]


def _pack_weights_module():
    spec = importlib.util.spec_from_file_location("pack_weights", REPO / "tools" / "pack_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pack_weights_int8_round_trip():
    pw = _pack_weights_module()
    torch.manual_seed(0)
    state = {
        "conv.weight": torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 0.1, 10.0, 0.001]).view(4, 1, 1, 1),
        "bn.running_mean": torch.randn(4),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    packed = pw.quantize(state)
    assert packed["conv.weight"].dtype == torch.int8
    back = pw.dequantize(packed)
    assert set(back) == set(state)
    w, r = state["conv.weight"], back["conv.weight"]
    step = w.abs().amax(dim=(1, 2, 3)) / 127  # per output channel: tiny channels keep their precision
    assert ((w - r).abs().amax(dim=(1, 2, 3)) <= step / 2 + 1e-9).all()
    assert torch.equal(back["bn.running_mean"], state["bn.running_mean"])
    assert back["bn.num_batches_tracked"].item() == 7


def test_paper_protocol_script_smoke(tmp_path):
    make_folder_dataset(tmp_path / "data" / "xray", per_class=10, size=40, groups_per_class=10)
    make_folder_dataset(tmp_path / "data" / "ct", classes=("covid", "normal"), per_class=8, size=40, groups_per_class=8)
    out = tmp_path / "out"
    # InceptionV3 weights travel int8 + xz and are restored by the script: rehearse that with a random network
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    packed = tmp_path / "inception.int8.pth.xz"
    torch.save(_pack_weights_module().quantize(net.state_dict()), tmp_path / "q.pth")
    packed.write_bytes(lzma.compress((tmp_path / "q.pth").read_bytes(), preset=0))
    data_root = os.path.relpath(tmp_path / "data", REPO)  # relative, as on the GPU machine (.gpu/data)
    scratch = tmp_path / "scratch" / "deeper"  # temporary folders at another depth than the repository
    scratch.mkdir(parents=True)
    env = {
        **os.environ,
        "SMOKE": "1",
        "DATA_ROOT": data_root,
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "INCEPTION_PACKED": str(packed),
        "TMPDIR": str(scratch),
    }
    proc = subprocess.run(
        ["bash", "benchmarks/device/paper_protocol.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for task in ("xray", "ct"):
        table = (out / f"reproduce_{task}.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("| ") and "(" in line.split("|")[1]]
        assert len(rows) == 6, table  # 3 models x 2 protocols
        assert "peak GPU MiB" in table and "s / epoch" in table
        assert "file inception_v3_imagenet.pth" in table  # the restored ImageNet weights, named by the run
    machine = (out / "machine.txt").read_text()
    assert "12 paper runs" in machine and "throughput ended" not in machine, machine
    assert machine.count(": exit 0 after") == 6, machine  # six processes (task x model), all finished
    assert "RATIO" in (out / "throughput.txt").read_text()
    assert (out / "paper_protocol_runs.tgz").stat().st_size > 1000
