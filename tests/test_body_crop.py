"""CT body crop (covidscan.data.hounsfield.body_box, the ``data.body_crop`` option): synthetic axial slices
whose body, lungs, table and text we place."""

import numpy as np
import pytest
import torch

from covidscan.config import load_config
from covidscan.data.hounsfield import body_box, crop_to_body
from covidscan.data.transforms import Preprocess, to_gray_uint8
from covidscan.errors import ConfigError
from covidscan.models import get_backbone


def axial(h=256, w=256, body=(0.5, 0.48, 0.34, 0.42), seed=0, table=True, text=True, fov=0.0):
    """A slice in a lung window: air around the patient (``fov`` grey inside a reconstruction circle), an
    elliptic bright body (cy, cx, ry, rx as fractions) holding two dark lungs, a table under it, a text label.
    Returns the image and the body's pixel box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.full((h, w), 0.02, np.float32)
    img[(yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.49**2] = fov
    cy, cx, ry, rx = body
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    img[m] = 0.85
    for lx in (cx - rx * 0.45, cx + rx * 0.45):
        img[((yy - cy) / (ry * 0.7)) ** 2 + ((xx - lx) / (rx * 0.35)) ** 2 < 1] = 0.15
    if table:
        img[int((cy + ry + 0.04) * h) : int((cy + ry + 0.07) * h), int(0.1 * w) : int(0.9 * w)] = 0.9
    if text:
        img[4:14, 4:60] = 1.0
    img += 0.02 * rng.standard_normal((h, w)).astype(np.float32)
    ys, xs = np.nonzero(m)
    return np.clip(img, 0, 1), (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)


@pytest.mark.parametrize("seed,fov", [(0, 0.0), (1, 0.0), (2, 0.35)])
def test_box_is_the_body_without_table_text_or_reconstruction_circle(seed, fov):
    img, (t, b, lft, r) = axial(seed=seed, fov=fov)
    top, bottom, left, right = body_box(img)
    h, w = img.shape
    slack = 0.05 * h
    assert abs(top - t) <= slack and abs(bottom - b) <= slack, (top, bottom, t, b)  # the table below is cut
    assert abs(left - lft) <= slack and abs(right - r) <= slack, (left, right, lft, r)
    assert top > 14  # the text label at the top is not in the box


def test_off_centre_body_is_followed():
    img, (t, b, lft, r) = axial(body=(0.45, 0.35, 0.3, 0.28))
    _, _, left, right = body_box(img)
    assert abs(left - lft) <= 0.05 * img.shape[1] and right < 0.75 * img.shape[1]


def test_slice_published_cropped_is_left_whole():
    """Lungs open to the image edge (a slice cut to the body by its publisher): the crop never cuts the chest."""
    img, (t, b, lft, r) = axial(table=False, text=False)
    dy, dx = int(0.2 * (b - t)), int(0.1 * (r - lft))  # into the lungs: they reach every edge, the mediastinum does not
    cropped = img[t + dy : b - dy, lft + dx : r - dx]
    assert body_box(cropped) == (0, cropped.shape[0], 0, cropped.shape[1])


@pytest.mark.parametrize("img", [np.full((100, 100), 0.5, np.float32), np.zeros((30, 30), np.float32)])
def test_nothing_body_like_keeps_whole_image(img):
    assert crop_to_body(img).shape == img.shape


def test_body_crop_option_contract_and_checkpointed():
    spec = get_backbone("densenet121")
    img, _ = axial()
    pre = Preprocess.for_backbone(spec, 64, body_crop=True)
    plain = Preprocess.for_backbone(spec, 64)
    a = to_gray_uint8(img, pre)
    assert torch.equal(a, to_gray_uint8(img, pre)) and a.shape == (1, 64, 64)
    assert not torch.equal(a, to_gray_uint8(img, plain))
    assert pre.cache_key() != plain.cache_key()
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert "body_crop" not in plain.to_dict()  # older checkpoints' layout kept
    cfg = load_config(None, ["data.task=ct", "data.body_crop=true"])
    assert Preprocess.from_config(spec, cfg.data).body_crop


def test_body_crop_algorithm_version_keys_the_image_cache(monkeypatch):
    """A change to the body box must not reuse images cropped by the old one (BODY_CROP_VERSION in the key)."""
    import covidscan.data.transforms as transforms

    pre = Preprocess.for_backbone(get_backbone("densenet121"), 64, body_crop=True)
    before = pre.cache_key()
    monkeypatch.setattr(transforms, "BODY_CROP_VERSION", transforms.BODY_CROP_VERSION + 1)
    assert pre.cache_key() != before


def test_body_crop_on_an_xray_recipe_is_refused():
    with pytest.raises(ConfigError, match="data.task=ct"):
        load_config(None, ["data.task=xray", "data.body_crop=true"])
