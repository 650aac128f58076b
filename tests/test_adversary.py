"""The conditional source adversary (train.adversary): features from which the source cannot be told, given the class."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.config import load_config
from covidscan.errors import ConfigError
from covidscan.training import train
from covidscan.training.adversary import SourceAdversary, dann_ramp, reverse_gradient
from tests.conftest import make_folder_dataset, tiny_config


def test_reversed_gradient_is_identity_forward_and_negated_scaled_backward():
    x = torch.randn(5, 3, requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.25 * torch.arange(3.0).expand(5, 3))


def test_ramp_starts_at_zero_rises_and_ends_near_one():
    vals = [dann_ramp(p) for p in np.linspace(0, 1, 11)]
    assert vals[0] == 0.0 and vals[-1] > 0.99
    assert all(b > a for a, b in zip(vals, vals[1:]))
    assert dann_ramp(-1) == 0.0 and dann_ramp(2) == dann_ramp(1)


class _Head(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(x)


class _Net(nn.Module):
    def __init__(self, d_in=4, d=8, k=2):
        super().__init__()
        self.backbone = nn.Linear(d_in, d)
        self.head = _Head(d, k)

    def forward(self, x):
        return self.head(self.backbone(x))


def _toy(n=400, seed=0):
    """Dimension 0 carries the class, dimension 1 the source (two hospitals in each class), 2-3 noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.3
    x[:, 0] += 2.0 * y - 1.0
    x[:, 1] += 2.0 * s - 1.0
    return x, y, s


def _source_separation(f, y, s):
    """Within each class, the squared distance between the two hospitals' feature means over the mean
    within-hospital variance (a Fisher ratio: 0 = the features do not tell the hospitals apart)."""
    out = []
    for k in (0, 1):
        fa, fb = f[(y == k) & (s == 0)], f[(y == k) & (s == 1)]
        out.append(float((fa.mean(0) - fb.mean(0)).pow(2).sum() / ((fa.var(0).sum() + fb.var(0).sum()) / 2)))
    return float(np.mean(out))


def _fit(weight: float, steps=400):
    torch.manual_seed(0)
    x, y, s = _toy()
    net = _Net()
    sources = ["a" if v == 0 else "b" for v in s.tolist()]
    adv = SourceAdversary.for_training(net, range(len(y)), y.tolist(), sources, len(y), weight=weight, total_steps=50)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    index = torch.arange(len(y))
    with adv.attached(net):
        for _ in range(steps):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            adv.zero_grad()
            (loss + adv.loss(index, y)).backward()
            opt.step()
            adv.step()
    assert not net.head.fc._forward_pre_hooks  # detached on exit
    xt, yt, st = _toy(seed=1)  # fresh images of the same two hospitals
    with torch.no_grad():
        class_acc = float((net(xt).argmax(1) == yt).float().mean())
        separation = _source_separation(net.backbone(xt), yt, st)
    return class_acc, separation, adv.metrics()


def test_adversary_removes_the_source_from_the_features_and_keeps_the_class():
    acc_plain, sep_plain, _ = _fit(weight=0.0)
    acc_adv, sep_adv, m = _fit(weight=1.0)
    x, y, s = _toy(seed=1)
    assert _source_separation(x, y, s) > 5  # the inputs tell the hospitals apart
    assert acc_plain > 0.95 and acc_adv > 0.95  # the class survives
    assert sep_plain > 2  # plain training keeps the hospital in the features
    assert sep_adv < 0.2 * sep_plain  # the adversary takes most of it out
    assert m["adv_scale"] > 0.99 and 0.0 <= m["adv_acc"] <= 1.0


def test_guess_is_among_the_sources_of_the_class_only_and_single_source_classes_give_no_loss():
    net = _Net(k=2)
    # class 0 from sources a and b, class 1 from c only
    adv = SourceAdversary.for_training(net, [0, 1, 2, 3], [0, 0, 1, 1], ["a", "b", "c", "c"], 6, weight=1.0, total_steps=10)
    assert adv.source_names == ["a", "b", "c"]
    assert adv.allowed.tolist() == [[True, True, False], [False, False, True]]
    logits = adv(torch.randn(2, 8), torch.tensor([0, 1]))
    assert torch.isinf(logits[0, 2]) and torch.isfinite(logits[0, :2]).all()
    assert torch.isinf(logits[1, :2]).all() and torch.isfinite(logits[1, 2])
    x = torch.randn(4, 4)
    with adv.attached(net):
        net(x)
        only_c = adv.loss(torch.tensor([2, 3]), torch.tensor([1, 1]))
        net(x)
        mixed = adv.loss(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]))
    assert float(only_c) == 0.0  # nothing to guess: class 1 has one source
    assert float(mixed) > 0.0 and adv.metrics()["adv_loss"] > 0
    with pytest.raises(RuntimeError, match="forward pass"):
        adv.loss(torch.tensor([0]), torch.tensor([0]))


def _two_hospitals(root):
    """The synthetic folder with each class split between two hospitals."""
    data = make_folder_dataset(root, per_class=8, size=40)
    path = data / "manifest.csv"
    rows = list(csv.DictReader(open(path)))
    for i, r in enumerate(rows):
        r["source"] = f"hospital{i % 2}"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return data


def test_training_with_the_adversary_changes_the_weights_not_what_is_saved(tmp_path):
    data = _two_hospitals(tmp_path / "d")
    plain = train(tiny_config(train={"epochs": 2, "seed": 3}), data, tmp_path / "plain")
    adv = train(tiny_config(train={"epochs": 2, "seed": 3, "adversary": 1.0}), data, tmp_path / "adv")
    a = load_checkpoint(plain.last_checkpoint)
    b = load_checkpoint(adv.last_checkpoint)
    assert a["state_dict"].keys() == b["state_dict"].keys()  # the adversary is not part of the model
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert b["meta"]["config"]["train"]["adversary"] == 1.0
    history = [json.loads(line) for line in open(tmp_path / "adv" / "history.jsonl")]
    assert all(0.0 <= h["adv_acc"] <= 1.0 and h["adv_loss"] > 0 for h in history)
    assert history[1]["adv_scale"] > history[0]["adv_scale"] > 0  # ramped up over the run
    model, _ = model_from_checkpoint(b)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_adversary_option_is_checked():
    assert load_config(None, ["train.adversary=0.5"]).train.adversary == 0.5
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, ["train.adversary=-1"])
    with pytest.raises(ConfigError, match="freeze_backbone"):
        load_config(None, ["train.adversary=1", "model.freeze_backbone=true"])
    with pytest.raises(ConfigError, match="mixup"):
        load_config(None, ["train.adversary=1", "train.mixup=0.2"])
