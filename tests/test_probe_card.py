import json

import pytest
import torch

from covidscan.cli import main
from covidscan.probe import centre_mask, mask_images, probe


def test_masks_are_complementary():
    imgs = torch.randint(0, 255, (2, 1, 40, 40), dtype=torch.uint8)
    m = centre_mask(40)
    b, c = mask_images(imgs, "borders"), mask_images(imgs, "centre")
    assert torch.equal(b[:, :, ~m], imgs[:, :, ~m]) and torch.equal(c[:, :, m], imgs[:, :, m])
    assert (b[:, :, m] == b[:, :, m][:, :, :1]).all()  # centre filled with one grey per image
    assert not torch.equal(b, imgs) and not torch.equal(c, imgs)


def test_probe_detects_a_border_shortcut(tmp_path):
    """A 'model' that only looks at the border region keeps its accuracy when the lungs are hidden."""
    from tests.conftest import make_folder_dataset

    data = make_folder_dataset(tmp_path / "d", per_class=10, size=48)
    # give each class a class-specific border brightness: a source-like shortcut
    import numpy as np
    from PIL import Image

    for ci, label in enumerate(("covid", "pneumonia", "normal")):
        for p in (data / label).glob("*.png"):
            a = np.asarray(Image.open(p)).copy()
            a[:4, :] = a[-4:, :] = 60 + 80 * ci
            Image.fromarray(a).save(p)
    from covidscan.training import train
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    res = train(tiny_config(train={"epochs": 6}), data, tmp_path / "run")
    r = probe(res.best_checkpoint, data)
    assert set(r["results"]) == {"full image", "borders only (centre masked)", "centre only (borders masked)"}
    assert 0 <= r["chance"] <= 1 and "verdict" in r and r["n"] == 30
    assert r["retained"] != r["retained"] or 0 <= r["chance"] < r["results"]["full image"]["accuracy"]


def test_probe_verdicts_hand_computed():
    from covidscan.probe import judge

    retained, text = judge(full=0.95, border=0.80, chance=0.35)  # (0.80-0.35)/(0.95-0.35) = 0.75
    assert retained == pytest.approx(0.75) and text.startswith("WARNING")
    retained, text = judge(full=0.95, border=0.50, chance=0.35)  # 0.25
    assert retained == pytest.approx(0.25) and "caution" in text
    retained, text = judge(full=0.95, border=0.38, chance=0.35)  # 0.05
    assert retained == pytest.approx(0.05) and "mainly on the central" in text
    retained, text = judge(full=0.30, border=0.30, chance=0.35)
    assert retained != retained and "no better than chance" in text


def test_card_cli(trained_run, tmp_path, capsys):
    result, _ = trained_run
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(result.best_checkpoint),
                "--out",
                str(tmp_path / "ev"),
                "--bootstrap",
                "20",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "card",
                "--checkpoint",
                str(result.best_checkpoint),
                "--metrics",
                str(tmp_path / "ev" / "metrics.json"),
                "--out",
                str(tmp_path / "card.md"),
            ]
        )
        == 0
    )
    card = (tmp_path / "card.md").read_text()
    assert "Not for clinical use" in card and "sensitivity" in card and "efficientnet_lite0" in card
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert f"{m['metrics']['accuracy'] * 100:.1f}" in card
