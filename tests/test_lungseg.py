"""Learned lung segmentation: a tiny U-Net learns, the shipped one finds two lungs, the options act."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from covidscan.data.lungs import LungUNet, apply_lungs, load_segmenter, lung_bbox, segment_lungs
from covidscan.data.transforms import Preprocess, to_gray_uint8
from covidscan.models import get_backbone
from covidscan.training.lungseg import dice, evaluate_segmenter, train_segmenter
from tests.conftest import chest_like, make_folder_dataset, tiny_config


def _synthetic(n: int, size: int, seed: int = 0):
    """Films with two dark lung ovals at random places and sizes; masks = the ovals."""
    rng = np.random.default_rng(seed)
    imgs, masks = [], []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        img = 0.7 + 0.05 * rng.standard_normal((size, size))
        m = np.zeros((size, size), bool)
        cy, w, h = rng.uniform(0.4, 0.6), rng.uniform(0.1, 0.16), rng.uniform(0.22, 0.32)
        for cx in (rng.uniform(0.25, 0.35), rng.uniform(0.65, 0.75)):
            m |= ((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2 < 1
        img[m] = 0.25 + 0.05 * rng.standard_normal(m.sum())
        imgs.append(np.clip(img, 0, 1))
        masks.append(m)
    return torch.tensor(np.stack(imgs), dtype=torch.float32)[:, None], torch.tensor(np.stack(masks))[:, None]


def test_tiny_unet_learns_a_synthetic_mask():
    images, masks = _synthetic(40, 32)
    torch.manual_seed(0)
    before = evaluate_segmenter(LungUNet(width=4), images[:8], masks[:8]).mean()
    res = train_segmenter(images, masks, epochs=25, batch_size=8, width=4, lr=5e-3)
    assert res.dice_val > 0.8 and res.dice_val > before + 0.3, (float(before), res.dice_val)
    assert len(res.dice_per_image) == 8  # 20% held out, never trained on


def test_dice_hand_computed():
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, :2] = True  # 8 pixels
    b[0, 1:3] = True  # 8 pixels, 4 shared
    assert dice(a, b).item() == pytest.approx(0.5, abs=1e-6)


def test_shipped_segmenter_finds_two_lungs():
    model, info = load_segmenter()
    assert info["dice_heldout_mean"] >= 0.9 and info["data_sha256"]
    img = chest_like(256, 0)  # grey body with two dark ovals
    mask = segment_lungs(img, model)
    labels, n = ndimage.label(mask)
    assert n == 2
    left, right = (ndimage.center_of_mass(mask, labels, i)[1] / 256 for i in (1, 2))
    assert sorted([left, right])[0] < 0.45 < 0.55 < sorted([left, right])[1]
    truth = np.zeros_like(mask)
    yy, xx = np.mgrid[0:256, 0:256] / 256
    for cx in (0.3, 0.7):
        truth |= ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    assert dice(torch.tensor(mask)[None], torch.tensor(truth)[None]).item() > 0.8


def test_lung_options_change_the_input_as_specified():
    img = chest_like(200, 1).astype(np.float32)
    img[:20, :60] = 1.0  # a bright text label in the corner, outside the lungs
    mask = segment_lungs(img)
    y0, y1, x0, x1 = lung_bbox(mask)
    cropped = apply_lungs(img, "crop")
    assert cropped.shape == (y1 - y0, x1 - x0) and cropped.shape[0] < 200
    masked = apply_lungs(img, "mask")
    assert masked.shape == img.shape and masked[5, 5] == pytest.approx(np.median(img))  # the label is gone
    assert np.array_equal(masked[mask], img[mask])  # the lungs are untouched
    both = apply_lungs(img, "both")
    assert both.shape == cropped.shape
    assert apply_lungs(img, "none") is img
    spec = get_backbone("efficientnet_lite0")
    plain = to_gray_uint8(img, Preprocess.for_backbone(spec, 64))
    seg = to_gray_uint8(img, Preprocess.for_backbone(spec, 64, lungs="crop"))
    assert not torch.equal(plain, seg) and seg.shape == plain.shape
    with pytest.raises(ValueError, match="lungs"):
        Preprocess.for_backbone(spec, 64, lungs="sideways")


def test_lung_option_travels_in_the_checkpoint(tmp_path):
    from covidscan.checkpoint import load_checkpoint
    from covidscan.inference import Predictor
    from covidscan.training import train

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=64)
    res = train(tiny_config(data={"lungs": "both"}, train={"epochs": 1}), data, tmp_path / "run")
    meta = load_checkpoint(res.best_checkpoint)["meta"]
    assert meta.preprocess.lungs == "both" and "_segboth" in meta.preprocess.cache_key()
    p = Predictor.from_checkpoint(res.best_checkpoint, device="cpu")
    assert p.pre.lungs == "both"
    assert abs(sum(p.predict(next((data / "covid").glob("*.png"))).probabilities.values()) - 1) < 1e-5
