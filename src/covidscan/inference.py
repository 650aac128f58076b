"""``Predictor``: checkpoint -> preprocessing -> class probabilities (+ Grad-CAM heat map).

Preprocessing comes from the checkpoint only (input size, normalisation, channel policy),
so prediction can never disagree with training. Inputs that do not look like what the
model was trained on get warnings (they are heuristics, not a guarantee):

* a colour photograph (channels differ);
* a nearly uniform, or extremely dark or bright, image;
* an image whose 16 x 16 appearance correlates with the mean training scan less than 99%
  of the training scans did, or whose closest training scan is further than the closest one of
  all but 0.5% of the validation scans (:mod:`covidscan.appearance`; a CT slice given to an X-ray
  model, an X-ray given to a CT model);
* CT models, a slice with Hounsfield units and (almost) no lung in it (neck, abdomen).

Any of these sets :attr:`Prediction.out_of_distribution`: the probabilities are then not a finding.

A Predictor is safe to share between threads: forward passes run under a lock.

Speed (``benchmarks/inference_options.py``, DenseNet121, one 224 px image, 2-core CPU, same run): the
model runs in channels_last (NHWC) memory format, 1.38x faster than NCHW with the same probabilities
(max difference 6e-8); ``backend="onnxruntime"`` runs the forward pass as the ONNX graph ``covidscan
export`` writes, 2.83x faster (difference 9e-8), at the cost of a few seconds' export when the
Predictor is made; Grad-CAM always uses the PyTorch model. ``torch.inference_mode`` (0.95x), one
thread (0.96x) and conv + BatchNorm folding (1.10x, DenseNet has one such pair) were measured and not kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from covidscan.appearance import appearance_correlation, nearest_training_correlation, unit_rows
from covidscan.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint
from covidscan.data.hounsfield import MIN_LUNG_PIXELS, lung_fraction
from covidscan.data.io import ScanImage, read_bytes, read_image
from covidscan.data.transforms import to_gray_uint8, to_input
from covidscan.explain import display_size, grad_cam
from covidscan.runtime import resolve_device


@dataclass
class Prediction:
    """``label`` is the most probable class. ``decision`` is set when the checkpoint carries an
    operating threshold (``covidscan calibrate``): ``{"class", "threshold", "positive"}``."""

    probabilities: dict[str, float]
    label: str
    warnings: list[str] = field(default_factory=list)
    source: str = ""
    decision: dict | None = None
    out_of_distribution: bool = False  # the scan is unlike what the model was trained on (see the module docstring)

    def to_dict(self) -> dict:
        d = {
            "source": self.source, "label": self.label, "probabilities": self.probabilities, "warnings": self.warnings,
            "out_of_distribution": self.out_of_distribution,
        }  # fmt: skip
        if self.decision is not None:
            d["decision"] = self.decision
        return d


BACKENDS = ("torch", "onnxruntime")
#: warnings that mean "not the kind of scan this model knows" (Prediction.out_of_distribution)
OOD_PREFIXES = ("does not look like", "colour image", "nearly uniform", "no lung in this slice")


class OnnxRuntimeForward:
    """The model's softmax probabilities computed by ONNX Runtime (CPU) from the graph ``covidscan export``
    writes, exported in memory; checked against PyTorch on a random batch when made.

    Raises:
        CovidscanError: onnxruntime / onnx missing (names the install), or the graph disagrees with PyTorch.
    """

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta, *, atol: float = 1e-4):
        import io
        import os

        from covidscan.errors import CovidscanError
        from covidscan.export import _WithSoftmax

        try:
            import onnxruntime as ort
        except ImportError:
            raise CovidscanError("the onnxruntime backend needs onnxruntime: pip install onnx onnxruntime") from None
        size = meta.preprocess.image_size
        net = _WithSoftmax(model.eval().cpu()).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        buf = io.BytesIO()
        torch.onnx.export(
            net, (x,), buf, input_names=["image"], output_names=["probabilities"], opset_version=17,
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads() or os.cpu_count() or 1
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            diff = float(np.abs(self(x) - net(x).numpy()).max())
        if diff > atol:
            raise CovidscanError(f"the ONNX graph differs from PyTorch by {diff:.1e} (> {atol:.0e}); use the torch backend")

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {"image": x.detach().cpu().float().contiguous().numpy()})[0]


class Predictor:
    def __init__(
        self, model: torch.nn.Module, meta: CheckpointMeta, device: str = "cpu", *, tta: bool = False, backend: str = "torch",
        provenance: dict | None = None,
    ):  # fmt: skip
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.meta = meta
        self.class_names: list[str] = list(meta.class_names)
        self.pre = meta.preprocess
        self.tta = tta  # test-time augmentation: mean probabilities of the image and its mirror image
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)  # 1.38x, same outputs
        self.backend = backend
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError("the onnxruntime backend runs on the CPU; use --device cpu or the torch backend")
        self._ort = OnnxRuntimeForward(self.model, meta) if backend == "onnxruntime" else None
        self._lock = threading.Lock()
        # the training scans' thumbnails (covidscan.provenance), for the nearest-training-scan check
        train = None if provenance is None else provenance["thumb"][provenance["subset"] == 0]
        self._train_unit = unit_rows(train) if train is not None and len(train) else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto", tta: bool = False, backend: str = "torch") -> Predictor:
        obj = load_checkpoint(path)
        model, meta = model_from_checkpoint(obj, path)
        dev = str(resolve_device(device)) if backend == "torch" else "cpu"
        return cls(model, meta, dev, tta=tta, backend=backend, provenance=obj.get("provenance"))

    @classmethod
    def from_pretrained(cls, name: str = "xray", *, device: str = "auto", tta: bool = False, backend: str = "torch") -> Predictor:
        """A model of the zoo (:mod:`covidscan.zoo`; ``covidscan models`` lists them), e.g. ``"xray"``."""
        from covidscan.zoo import checkpoint_path

        return cls.from_checkpoint(checkpoint_path(name), device=device, tta=tta, backend=backend)

    @property
    def task(self) -> str:
        return self.meta.task

    def tensor(self, scan: ScanImage) -> torch.Tensor:
        """The model input for ``scan``: ``1 x 3 x S x S`` float32."""
        return to_input(to_gray_uint8(scan, self.pre), self.pre)[None]

    def check(self, scan: ScanImage, u8: torch.Tensor | None = None) -> list[str]:
        """Warnings for inputs unlike the training scans; ``u8`` = ``to_gray_uint8(scan)`` if already made."""
        warns = []
        px = scan.pixels
        if scan.is_color and float(np.abs(px - px.mean(2, keepdims=True)).mean()) > 0.03:
            warns.append("colour image: this looks like a photograph, not a radiograph or CT slice")
        g = px if px.ndim == 2 else px.mean(2)
        if float(g.std()) < 0.02:
            warns.append("nearly uniform image: values barely vary")
        elif float(g.mean()) < 0.03 or float(g.mean()) > 0.97:
            warns.append(f"values out of the usual range (mean intensity {float(g.mean()):.2f})")
        ref = self.meta.reference or {}
        u8 = to_gray_uint8(scan, self.pre) if u8 is None else u8
        unlike = []
        if ref.get("thumb"):
            corr = appearance_correlation(u8, ref)
            if corr < ref["corr_p01"]:
                unlike.append(f"appearance correlation {corr:.2f} < {ref['corr_p01']:.2f}")
        if self._train_unit is not None and "nn_threshold" in ref:
            near = nearest_training_correlation(u8, self._train_unit)
            if near < ref["nn_threshold"]:
                unlike.append(f"closest training scan correlates {near:.2f} < {ref['nn_threshold']:.2f}")
        if unlike:
            other = "CT" if self.task == "xray" else "X-ray"
            warns.append(
                f"does not look like the {self.task} scans this model was trained on ({'; '.join(unlike)}); a {other} image?"
            )
        if self.task == "ct" and scan.hu is not None:
            lung = lung_fraction(scan.hu)
            if lung < MIN_LUNG_PIXELS:
                warns.append(f"no lung in this slice ({lung:.1%} of it is lung): a CT model scores chest slices only")
        return warns

    @staticmethod
    def out_of_distribution(warnings: list[str]) -> bool:
        """True when a warning says the scan is not the kind the model knows (not for mere oddities of range)."""
        return any(w.startswith(OOD_PREFIXES) for w in warnings)

    def _prediction(self, p: np.ndarray, warns: list[str], source: str) -> Prediction:
        probs = {n: float(v) for n, v in zip(self.class_names, p)}
        return Prediction(
            probs, self.class_names[int(p.argmax())], warns, source, self.decide(probs), self.out_of_distribution(warns)
        )

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        with self._lock:
            if self._ort is not None:
                p = self._ort(x)
                return (p + self._ort(x.flip(-1))) / 2 if self.tta else p
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            p = self.model(x).float().softmax(1)
            if self.tta:
                p = (p + self.model(x.flip(-1)).float().softmax(1)) / 2
            return p.cpu().numpy()

    def predict_scan(self, scan: ScanImage, source: str = "") -> Prediction:
        u8 = to_gray_uint8(scan, self.pre)  # decoded, resized once for the model and the checks
        p = self.probabilities(to_input(u8, self.pre)[None])[0]
        return self._prediction(p, self.check(scan, u8), source or str(scan.path))

    def decide(self, probs: dict[str, float]) -> dict | None:
        """Positive / negative at the checkpoint's calibrated threshold; None when it has none."""
        t = self.meta.threshold
        if not t or t.get("level") == "study":  # a study-level threshold decides studies, not single images
            return None
        return {"class": t["class"], "threshold": t["value"], "positive": probs[t["class"]] >= t["value"]}

    def predict(self, item, *, batch: int = 8):
        """One scan -> :class:`Prediction`; a list of scans -> a list, run through the model in batches.

        A scan is a path, the bytes of a file, a numpy array (``H x W`` or ``H x W x 3``; uint8, uint16, or
        float in [0, 1]) or a :class:`ScanImage`.
        """
        if isinstance(item, list | tuple):
            scans = [self._as_scan(x) for x in item]
            out = []
            for start in range(0, len(scans), batch):
                part = scans[start : start + batch]
                u8 = [to_gray_uint8(sc, self.pre) for sc, _ in part]
                probs = self.probabilities(torch.stack([to_input(u, self.pre) for u in u8]))
                for (sc, src), u, p in zip(part, u8, probs):
                    out.append(self._prediction(p, self.check(sc, u), src))
            return out
        scan, src = self._as_scan(item)
        return self.predict_scan(scan, src)

    @staticmethod
    def _as_scan(item) -> tuple[ScanImage, str]:
        if isinstance(item, ScanImage):
            return item, str(item.path)
        if isinstance(item, bytes | bytearray):
            return read_bytes(bytes(item), "<bytes>"), "<bytes>"
        if isinstance(item, np.ndarray):
            a = item
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[..., 0]
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or min(a.shape[:2]) < 2:
                raise ValueError(f"array of shape {item.shape}: expected H x W or H x W x 3")
            if a.dtype == np.uint8:
                px = a.astype(np.float32) / 255
            elif a.dtype == np.uint16:
                px = a.astype(np.float32) / 65535
            else:
                px = a.astype(np.float32)
                if not np.isfinite(px).all() or px.min() < 0 or px.max() > 1:
                    raise ValueError("float arrays must hold values in [0, 1] (uint8 and uint16 are scaled)")
            return ScanImage(pixels=px, format="array", mode=str(item.dtype), path=Path("<array>")), "<array>"
        return read_image(item), str(item)

    def predict_bytes(self, data: bytes, name: str = "<upload>") -> Prediction:
        return self.predict_scan(read_bytes(data, name), name)

    def explain(self, scan: ScanImage, class_name: str | None = None, method: str = "gradcam") -> tuple[np.ndarray, str]:
        """Grad-CAM map in [0, 1] for ``class_name`` (default: predicted), at the scan's aspect ratio with
        the longer side at most :data:`covidscan.explain.DISPLAY_MAX` (the scan's own size when smaller),
        so a huge upload cannot make a huge map."""
        x = self.tensor(scan).to(self.device)
        if class_name is not None and class_name not in self.class_names:
            raise ValueError(f"unknown class {class_name!r}; choose one of {', '.join(self.class_names)}")
        with self._lock:
            cam, k = grad_cam(
                self.model,
                x,
                None if class_name is None else self.class_names.index(class_name),
                size=display_size(scan.height, scan.width),
                method=method,
            )
        return cam, self.class_names[k]
