"""MixStyle (train.mixstyle): feature styles blended across images during the optimisation steps only."""

import pytest
import torch
from torch import nn

from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.config import load_config
from covidscan.errors import ConfigError
from covidscan.models import build_model, get_backbone, list_backbones
from covidscan.training import train
from covidscan.training.mixstyle import mix_styles, mixing_styles, style_modules
from tests.conftest import make_folder_dataset, tiny_config


def _stats(x):
    return x.mean(dim=(2, 3)), x.std(dim=(2, 3))


def test_mixed_styles_are_blends_of_two_images_styles_and_content_is_kept():
    torch.manual_seed(0)
    # four images whose channels have very different means and spreads: the "styles" of four sources
    base = torch.randn(4, 3, 8, 8)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    shift = torch.tensor([-3.0, 0.0, 2.0, 5.0]).view(4, 1, 1, 1)
    x = base * scale + shift
    out = mix_styles(x, alpha=5.0)  # lam near 0.5: styles clearly blended
    mu, sig = _stats(x)
    mu_o, sig_o = _stats(out)
    assert (mu_o - mu).abs().max() > 0.5  # the styles changed
    for i in range(4):
        # one partner j and one weight lam explain every channel's mean and spread of image i
        fits = []
        for j in range(4):
            d = mu[i] - mu[j]
            lam = 1.0 if j == i else float((mu_o[i] - mu[j]) @ d / (d @ d))
            err = (mu_o[i] - (lam * mu[i] + (1 - lam) * mu[j])).abs().max() + (
                sig_o[i] - (lam * sig[i] + (1 - lam) * sig[j])
            ).abs().max()
            fits.append((float(err), lam))
        err, lam = min(fits)
        assert err < 1e-3 and -1e-4 <= lam <= 1 + 1e-4
        # the content (the normalised map) is unchanged: same spatial pattern, correlation 1 per channel
        a, b = x[i].flatten(1), out[i].flatten(1)
        corr = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)
        assert torch.allclose(corr, torch.ones(3), atol=1e-4)
    assert mix_styles(x[:1]) is x[:1] or torch.equal(mix_styles(x[:1]), x[:1])  # one image: nothing to mix with


def test_hooks_act_only_inside_the_block_and_only_on_the_named_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    x = torch.randn(6, 3, 10, 10) * torch.linspace(0.2, 3, 6).view(6, 1, 1, 1)
    with torch.no_grad():
        before = net(x)
        with mixing_styles(net, ["0"], p=1.0):
            during = net(x)
        with mixing_styles(net, ["0"], p=0.0):  # p = 0: nothing hooked
            off = net(x)
        after = net(x)
    assert not torch.allclose(during, before)
    assert torch.equal(off, before) and torch.equal(after, before)
    assert not net[0]._forward_hooks
    with pytest.raises(RuntimeError):  # hooks are removed when the block fails too
        with mixing_styles(net, ["0"], p=1.0):
            raise RuntimeError("boom")
    assert not net[0]._forward_hooks
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        with mixing_styles(net, ["nope"], p=0.5):
            pass
    with pytest.raises(ConfigError, match="no style_layers"):
        with mixing_styles(net, [], p=0.5):
            pass


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_names_early_layers_that_exist(name):
    spec = get_backbone(name)
    model, _ = build_model(name, "linear", 2)
    mods = style_modules(model, spec.style_layers)
    assert mods, f"{name}: train.mixstyle needs style_layers"
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, i, o: shapes.append(o.shape)) for m in mods]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, spec.input_size, spec.input_size))
    for h in hooks:
        h.remove()
    # feature maps of the early stages: 4-d, larger than the final map (stride < 32)
    assert all(len(s) == 4 and s[-1] > spec.input_size // 32 for s in shapes)


def test_training_with_mixstyle_changes_the_weights_but_not_what_is_saved_or_validated(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=6, size=40)
    plain = train(tiny_config(train={"epochs": 1, "seed": 3}), data, tmp_path / "plain")
    mixed = train(tiny_config(train={"epochs": 1, "seed": 3, "mixstyle": 1.0}), data, tmp_path / "mixed")
    a = load_checkpoint(plain.last_checkpoint)
    b = load_checkpoint(mixed.last_checkpoint)
    assert a["state_dict"].keys() == b["state_dict"].keys()  # no parameters or buffers added
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert b["meta"]["config"]["train"]["mixstyle"] == 1.0
    # the saved model is a plain model: no hooks left, deterministic in eval mode
    model, _ = model_from_checkpoint(b)
    model.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert not any(m._forward_hooks for m in model.modules())


def test_mixstyle_option_is_checked():
    with pytest.raises(ConfigError, match="probability"):
        load_config(None, ["train.mixstyle=1.5"])
    assert load_config(None, ["train.mixstyle=0.5"]).train.mixstyle == 0.5
