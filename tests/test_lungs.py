"""Lung-field crop heuristic (covidscan.data.lungs): on synthetic films whose lungs we place."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from covidscan.data.lungs import frame_lungs, lung_box, lung_field_mask
from covidscan.data.transforms import Preprocess, to_gray_uint8
from covidscan.models import get_backbone


def film(h=300, w=260, lungs=((0.33, 0.5), (0.67, 0.5)), seed=0, ry=0.25, rx=0.12):
    """A padded film: black outside air at the sides, a bright body, dark elliptic lungs,
    a white text marker in the top-left corner. Returns the image and each lung's pixel box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.75 + 0.03 * rng.standard_normal((h, w))
    img[:, : int(0.08 * w)] = 0.02  # air beside the patient (left edge)
    img[:, w - int(0.08 * w) :] = 0.02  # (right edge)
    boxes = []
    for cx, cy in lungs:
        m = ((xx / w - cx) / rx) ** 2 + ((yy / h - cy) / ry) ** 2 < 1
        img[m] = 0.2 + 0.03 * rng.standard_normal(m.sum())
        ys, xs = np.nonzero(m)
        boxes.append((ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
    img[5:25, 2:60] = 1.0  # "L" marker / text
    return np.clip(img, 0, 1).astype(np.float32), boxes


def contains(outer, inner, slack):
    return (
        outer[0] <= inner[0] + slack
        and outer[1] >= inner[1] - slack
        and outer[2] <= inner[2] + slack
        and outer[3] >= inner[3] - slack
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_holds_both_lungs_and_drops_corner_text(seed):
    img, lungs = film(seed=seed)
    box = lung_box(img)
    h, w = img.shape
    for lb in lungs:
        assert contains(box, lb, slack=0.03 * h), (box, lb)
    # tighter than the film: the text marker at rows 5-25 and the air strips are cut
    assert box[0] > 25 and box[2] > 0.08 * w and box[3] < w - 0.08 * w
    area = (box[1] - box[0]) * (box[3] - box[2]) / (h * w)
    assert area < 0.75


def test_off_centre_body_is_followed():
    img, lungs = film(lungs=((0.25, 0.45), (0.52, 0.45)), rx=0.1)
    box = lung_box(img)
    for lb in lungs:
        assert contains(box, lb, slack=0.03 * img.shape[0])
    assert box[3] < 0.85 * img.shape[1]  # the empty right part is not kept


def test_one_lung_found_gives_mirrored_box():
    img, lungs = film(lungs=((0.3, 0.5),))  # e.g. a white-out of the other lung
    y0, y1, x0, x1 = lung_box(img)
    w = img.shape[1]
    assert x0 <= lungs[0][2] and abs((x0 + x1) / 2 - w / 2) <= 2  # symmetric about the midline


@pytest.mark.parametrize("img", [np.full((200, 200), 0.5, np.float32), np.zeros((20, 20), np.float32)])
def test_nothing_lung_like_keeps_whole_image(img):
    assert lung_box(img) == (0, img.shape[0], 0, img.shape[1])


def test_lung_crop_option_contract_and_checkpointed():
    spec = get_backbone("densenet121")
    img, _ = film()
    pre = Preprocess.for_backbone(spec, 64, lung_crop=True)
    plain = Preprocess.for_backbone(spec, 64)
    a, b = to_gray_uint8(img, pre), to_gray_uint8(img, pre)
    assert torch.equal(a, b) and a.shape == (1, 64, 64) and a.dtype == torch.uint8
    assert not torch.equal(a, to_gray_uint8(img, plain))
    assert pre.cache_key() != plain.cache_key()  # cached images of the two never mix
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({k: v for k, v in plain.to_dict().items() if k != "lung_crop"}) == plain  # older checkpoints


def axial(h=220, w=260, bridge=False, lesion=False, seed=0, lesion_size=(0.03, 0.04)):
    """A synthetic axial CT slice in a lung window: dark air around a bright body, two dark lungs; ``bridge``
    joins the lungs across the midline (anterior junction); ``lesion`` puts a bright consolidation (radii
    ``lesion_size``, fractions of the side) against the pleura of the right-hand lung. Returns the image,
    the two lungs' mask and the lesion's mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.full((h, w), 0.05, np.float32)
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.4) ** 2 < 1
    img[body] = 0.85
    lungs = np.zeros((h, w), bool)
    for cx in (0.32, 0.68):
        lungs |= ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.27) ** 2 < 1
    if bridge:
        lungs |= (np.abs(xx - 0.5) < 0.06) & (np.abs(yy - 0.35) < 0.1)
    img[lungs] = 0.2
    les = ((xx - 0.8) / lesion_size[0]) ** 2 + ((yy - 0.5) / lesion_size[1]) ** 2 < 1
    if lesion:
        img[les] = 0.8  # as bright as soft tissue: a threshold alone would cut it out of the lung
    img += 0.02 * rng.standard_normal((h, w)).astype(np.float32)
    return np.clip(img, 0, 1), lungs, les


@pytest.mark.parametrize("bridge", [False, True])
def test_lung_mask_keeps_the_lungs_and_drops_body_and_air(bridge):
    img, lungs, _ = axial(bridge=bridge)
    m = lung_field_mask(img)
    assert m.shape == img.shape and m.dtype == bool
    assert m[lungs].mean() > 0.95  # nearly all of both lungs, joined ones included
    outside = ~ndimage.binary_dilation(lungs, iterations=15)
    assert m[outside].mean() < 0.1  # air around the patient and most of the body are dropped
    out = frame_lungs(img, crop=False, mask=True)
    assert (out[~m] == 0).all() and np.array_equal(out[m], img[m])


def test_lung_mask_takes_in_a_lesion_at_the_lung_edge():
    img, lungs, les = axial(lesion=True)
    m = lung_field_mask(img)
    assert m[les & lungs].mean() > 0.9  # the consolidation stays in (closed and filled), not cut out as "body"


@pytest.mark.parametrize("centre, radius", [(0.75, 0.2), (0.7, 0.22), (0.65, 0.25)])
def test_lung_mask_leaves_out_the_liver_dome_at_the_lung_base(centre, radius):
    """At the lung base the right lung is a crescent around the liver dome: bright tissue inside the lung's
    convex hull that looks like consolidation. The crescent stays in, the dome stays out, also when the
    crescent is too short for the lung search's shape test (the other side is then searched, not mirrored)."""
    img, lungs, _ = axial()
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    dome = ((xx - 0.32 * w) ** 2 + (yy - centre * h) ** 2 < (radius * h) ** 2) & lungs
    img[dome] = 0.85
    m = lung_field_mask(img)
    assert m[lungs & ~dome].mean() > 0.95  # both lungs, the crescent included
    assert m[dome].mean() < 0.2  # a convex hull (or the other lung mirrored) took in all of it


@pytest.mark.parametrize("img", [np.full((200, 200), 0.5, np.float32), np.zeros((20, 20), np.float32)])
def test_no_lungs_found_mask_keeps_everything(img):
    assert lung_field_mask(img).all()
    assert np.array_equal(frame_lungs(img, crop=True, mask=True), img)


def test_lung_crop_without_mask_is_the_box_unchanged():
    img, _ = film()
    y0, y1, x0, x1 = lung_box(img)
    assert np.array_equal(frame_lungs(img, crop=True), img[y0:y1, x0:x1])  # what lung_crop checkpoints were trained on


def test_lung_mask_option_contract_and_checkpointed():
    spec = get_backbone("densenet121")
    img, lungs, _ = axial()
    pre = Preprocess.for_backbone(spec, 64, lung_mask=True)
    plain = Preprocess.for_backbone(spec, 64)
    a = to_gray_uint8(img, pre)
    assert torch.equal(a, to_gray_uint8(img, pre)) and a.shape == (1, 64, 64)
    small = torch.nn.functional.interpolate(torch.from_numpy(lungs)[None, None].float(), size=(64, 64))[0]
    assert a[small == 0].float().mean() < 30 < a[small == 1].float().mean()  # black outside the lungs
    assert pre.cache_key() != plain.cache_key()
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert "lung_mask" not in plain.to_dict()  # checkpoints without it keep their layout
    both = Preprocess.for_backbone(spec, 64, lung_mask=True, lung_crop=True)
    assert both.cache_key() not in (pre.cache_key(), plain.cache_key())


def test_checkpoint_of_another_lung_mask_version_warns(caplog):
    from covidscan.data.lungs import MASK_VERSION

    pre = Preprocess.for_backbone(get_backbone("densenet121"), 64, lung_mask=True)
    d = pre.to_dict()
    assert d["lung_mask_version"] == MASK_VERSION
    with caplog.at_level("WARNING"):
        assert Preprocess.from_dict(d) == pre
    assert "lung mask version" not in caplog.text
    old = {k: v for k, v in d.items() if k != "lung_mask_version"}  # written before the mask was versioned: 1
    with caplog.at_level("WARNING"):
        assert Preprocess.from_dict(old) == pre
    assert "lung mask version 1" in caplog.text
