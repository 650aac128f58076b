"""ONNX export of a checkpoint, checked against PyTorch with onnxruntime.

The exported graph takes the preprocessed ``N x 3 x S x S`` float32 input (the checkpoint's
preprocessing; see ``covidscan.data.transforms``) and returns softmax probabilities
``N x classes``. The checkpoint's metadata (class names, preprocessing) is stored in the
ONNX file's ``metadata_props``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint


class _WithSoftmax(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


def export_onnx(
    model, meta: CheckpointMeta | dict, path: str | Path, *, opset: int = 17, check: bool = True, atol: float = 1e-4
) -> float:
    """Export; returns the max abs difference to PyTorch on a random batch (ValueError if > atol).

    ``meta``: the checkpoint's :class:`CheckpointMeta`, or a dict with at least ``class_names``,
    ``preprocess.image_size``, ``task`` and ``backbone``.
    """
    meta = meta.to_dict() if isinstance(meta, CheckpointMeta) else meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(meta["preprocess"]["image_size"])
    net = _WithSoftmax(model.eval().cpu()).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(
        net,
        (x,),
        str(tmp),
        input_names=["image"],
        output_names=["probabilities"],
        opset_version=opset,
        dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
        dynamo=False,
    )
    import onnx

    proto = onnx.load(str(tmp))
    for key, value in (
        ("covidscan_class_names", json.dumps(meta["class_names"])),
        ("covidscan_preprocess", json.dumps(meta["preprocess"])),
        ("covidscan_task", meta["task"]),
        ("covidscan_backbone", meta["backbone"]),
        ("covidscan_weights_source", str(meta.get("weights_source", ""))),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
    diff = onnx_parity(net, tmp, x) if check else float("nan")
    if check and diff > atol:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"ONNX output differs from PyTorch by {diff:.2e} > {atol:.0e}; not written")
    tmp.replace(path)
    return diff


def onnx_parity(net, onnx_path, x: torch.Tensor) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    return float(np.abs(got - ref).max())


def export_checkpoint(checkpoint, onnx_path, **kw) -> float:
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    return export_onnx(model, meta, onnx_path, **kw)
