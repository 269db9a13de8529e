"""Gradient-family methods against Captum and pytorch-grad-cam on small float64 models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed_attr.methods import Context, build_method, compute_maps, resolve_layer

captum_attr = pytest.importorskip("captum.attr")
base_cam = pytest.importorskip("pytorch_grad_cam.base_cam")
from pytorch_grad_cam import GradCAM as RefGradCAM, GradCAMPlusPlus as RefGradCAMPlusPlus  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    """Conv trunk (16 x 16 -> 8 x 8 features), global average pooling, linear head. With
    ``functional=True`` the same weights run through ``F.relu`` instead of ``nn.ReLU`` modules."""

    def __init__(self, channels: int = 3, classes: int = 5, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.features = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        act = F.relu if self.functional else None
        h = self.conv1(x)
        h = act(h) if act else self.relu1(h)
        h = self.conv2(h)
        h = act(h) if act else self.relu2(h)
        h = self.features(h)
        return self.head(h.mean(dim=(2, 3)))


def make_model(functional: bool = False, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(functional=functional).double().eval()
    return model


def make_inputs(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    target = torch.tensor([0, 3, 1, 4, 2, 0][:n])
    return x, target


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ref = torch.as_tensor(ref).detach().double()
    return float((ours.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run(name: str, model, x, target, layer=None, **params) -> torch.Tensor:
    m = build_method(name, params)
    return compute_maps(model, x, target, [m], Context(layer=layer, budget=4))[name]


def test_saliency_matches_captum():
    model, (x, t) = make_model(), make_inputs()
    ref = captum_attr.Saliency(model).attribute(x, target=t, abs=True).amax(dim=1)
    assert rel_err(run("saliency", model, x, t), ref) < 1e-4


def test_gradient_x_input_matches_captum():
    model, (x, t) = make_model(), make_inputs()
    ref = captum_attr.InputXGradient(model).attribute(x, target=t).sum(dim=1)
    assert rel_err(run("gradient_x_input", model, x, t), ref) < 1e-4


@pytest.mark.parametrize(
    "rule", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integrated_gradients_matches_captum(rule):
    model, (x, t) = make_model(), make_inputs()
    ours = run("integrated_gradients", model, x, t, steps=7, baseline=-0.25, rule=rule)
    ref = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=-0.25, target=t, n_steps=7, method=rule, internal_batch_size=5
    ).sum(dim=1)
    if rule == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n (halved at the ends), summing to (n-1)/n; ours are
        # the trapezoid rule's 1/(n-1), summing to 1 (completeness holds). Same nodes otherwise.
        ref = ref * 7 / 6
    assert rel_err(ours, ref) < 1e-4


def test_guided_backprop_matches_captum_on_relu_modules():
    model, (x, t) = make_model(), make_inputs()
    ref = captum_attr.GuidedBackprop(model).attribute(x, target=t).sum(dim=1)
    plain = captum_attr.Saliency(model).attribute(x, target=t, abs=False).sum(dim=1)
    assert rel_err(plain, ref) > 1e-2  # guided differs from the plain gradient, so the check bites
    for relu in ("all", "modules"):
        assert rel_err(run("guided_backprop", model, x, t, relu=relu), ref) < 1e-4


def test_guided_backprop_handles_functional_relu():
    modules, functional = make_model(False), make_model(True)
    x, t = make_inputs()
    # Captum sees every ReLU of the module model; ours must see them in the F.relu model too.
    ref_all = captum_attr.GuidedBackprop(modules).attribute(x, target=t).sum(dim=1)
    assert rel_err(run("guided_backprop", functional, x, t, relu="all"), ref_all) < 1e-4
    # relu="modules" reproduces Captum's limitation on the F.relu model (only features' nn.ReLU).
    ref_modules = captum_attr.GuidedBackprop(functional).attribute(x, target=t).sum(dim=1)
    assert rel_err(run("guided_backprop", functional, x, t, relu="modules"), ref_modules) < 1e-4
    assert rel_err(ref_modules, ref_all) > 1e-2


def test_guided_backprop_leaves_the_model_unchanged():
    model, (x, t) = make_model(True), make_inputs()
    before = model(x)
    run("guided_backprop", model, x, t)
    assert torch.equal(model(x), before)
    assert not model.conv1._forward_hooks and not model.relu1._forward_hooks


class FunctionalOnly(nn.Module):
    """Convolutions with ``F.relu`` calls only (no ``nn.ReLU`` module), or with ``act`` instead."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))).mean(dim=(2, 3)))


def test_guided_backprop_refuses_models_without_relus_it_can_guide():
    """A GELU ViT used to get the plain gradient, silently: nothing to guide."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    for relu in ("all", "modules"):
        with pytest.raises(ValueError, match=rf"guided_backprop: .*no ReLU it can guide \(relu='{relu}'.*"
                                             r"it ran gelu x 2\..*plain input gradient"):
            run("guided_backprop", vit, x, torch.tensor([0, 1]), relu=relu)
    # relu="modules" on a model calling F.relu only: named, with the setting that covers it
    torch.manual_seed(0)
    functional = FunctionalOnly().double().eval()
    x, t = make_inputs()
    with pytest.raises(ValueError, match=r"relu='modules'.*functional relu x 2 \(guided by relu='all' only\)"):
        run("guided_backprop", functional, x, t, relu="modules")
    assert run("guided_backprop", functional, x, t, relu="all").abs().max() > 0


def test_guided_backprop_without_any_rectifier_is_the_gradient():
    """No rectifier at all (tanh here): the definition leaves the gradient as it is; allowed."""
    torch.manual_seed(0)
    model = FunctionalOnly(act=torch.tanh).double().eval()
    x, t = make_inputs()
    ref = captum_attr.Saliency(model).attribute(x, target=t, abs=False).sum(dim=1)
    assert rel_err(run("guided_backprop", model, x, t), ref) < 1e-6  # the maps are float32


def test_gradcam_matches_captum_layer_gradcam():
    model, (x, t) = make_model(), make_inputs()
    layer = model.features
    ours = run("gradcam", model, x, t, layer=layer)
    lgc = captum_attr.LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    ref = captum_attr.LayerAttribution.interpolate(lgc, (16, 16), interpolate_mode="bilinear")
    assert rel_err(ours, ref[:, 0]) < 1e-4
    assert ours.min() >= 0 and (ours.amax(dim=(1, 2)) > 0).all()  # a non-trivial map per image


def _grad_cam_unscaled(cls, model, layer, x, t, monkeypatch) -> torch.Tensor:
    """pytorch-grad-cam's map before its min-max scaling and resize (at layer resolution)."""
    monkeypatch.setattr(base_cam, "scale_cam_image", lambda cam, target_size=None: np.asarray(cam, dtype=np.float64))
    with cls(model=model, target_layers=[layer]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    return torch.from_numpy(np.asarray(out, dtype=np.float64))


@pytest.mark.parametrize("name,cls", [("gradcam", RefGradCAM), ("gradcam_pp", RefGradCAMPlusPlus)])
def test_cams_match_pytorch_grad_cam_before_its_normalisation(name, cls, monkeypatch):
    model, (x, t) = make_model(), make_inputs()
    layer = model.features
    ours = run(name, model, x, t, layer=layer)
    assert (ours.amax(dim=(1, 2)) > 0).all()
    ref_model = make_model()  # its own copy: pytorch-grad-cam calls backward() on the weights
    ref_small = _grad_cam_unscaled(cls, ref_model, ref_model.features, x, t, monkeypatch)
    assert ref_small.shape == (3, 8, 8)
    assert ref_small.abs().max() > 0
    ref = F.interpolate(ref_small[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    # pytorch-grad-cam works in float32 NumPy: 1e-4 relative is its own precision.
    assert rel_err(ours, ref) < 1e-4


def test_gradcam_pp_weights_differ_from_gradcam():
    model, (x, t) = make_model(), make_inputs()
    a = run("gradcam", model, x, t, layer=model.features)
    b = run("gradcam_pp", model, x, t, layer=model.features)
    assert rel_err(a / a.amax(dim=(1, 2), keepdim=True), b / b.amax(dim=(1, 2), keepdim=True)) > 1e-3


def test_resolve_layer_finds_last_spatial_stage():
    model, (x, _) = make_model(), make_inputs()
    assert resolve_layer(model, None, x) is model.features
    with pytest.raises(ValueError, match="conv"):
        resolve_layer(model, "nope", x)


def test_gradient_group_shares_one_forward_pass_and_matches_members_alone():
    model, (x, t) = make_model(), make_inputs(4)
    calls = []
    model.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]))
    names = ["saliency", "gradient_x_input", "gradcam", "gradcam_pp"]
    ctx = Context(layer=model.features, budget=64)
    together = compute_maps(model, x, t, [build_method(n) for n in names], ctx)
    assert calls == [4]  # one forward pass over the batch for the four methods
    for n in names:
        alone = compute_maps(model, x, t, [build_method(n)], ctx)[n]
        torch.testing.assert_close(together[n], alone, rtol=1e-6, atol=1e-12)


def test_cam_layer_parameter_overrides_ctx_layer():
    model, (x, t) = make_model(), make_inputs()
    calls = []
    model.register_forward_pre_hook(lambda mod, inp: calls.append(1))
    named = build_method("gradcam", {"layer": "conv2"})
    ms = [build_method("saliency"), named, build_method("gradcam_pp")]
    out = compute_maps(model, x, t, ms, Context(layer=model.features))
    assert len(calls) == 2  # two CAM layers: two passes, saliency riding on the first
    by_ctx = compute_maps(model, x, t, [build_method("gradcam")], Context(layer=model.conv2))["gradcam"]
    assert torch.equal(out["gradcam"], by_ctx)
    pp = compute_maps(model, x, t, [build_method("gradcam_pp")], Context(layer=model.features))["gradcam_pp"]
    torch.testing.assert_close(out["gradcam_pp"], pp, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="not a submodule"):
        compute_maps(model, x, t, [build_method("gradcam", {"layer": "nope"})], Context())


def test_gradient_methods_need_a_layer_only_for_cams():
    model, (x, t) = make_model(), make_inputs()
    with pytest.raises(ValueError, match="layer"):
        compute_maps(model, x, t, [build_method("gradcam")], Context())


def test_no_weight_gradients_are_accumulated():
    model, (x, t) = make_model(True), make_inputs()
    for name in ["saliency", "gradcam", "gradcam_pp", "integrated_gradients", "guided_backprop"]:
        run(name, model, x, t, layer=model.features)
    assert all(p.grad is None for p in model.parameters())


def test_bfloat16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, t = make_inputs()
    x = x.float()
    m = build_method("saliency")
    full = compute_maps(model, x, t, [m], Context())["saliency"]
    half = compute_maps(model, x, t, [m], Context(autocast=torch.bfloat16))["saliency"]
    assert half.dtype == torch.float32
    corr = np.corrcoef(full.flatten().numpy(), half.flatten().numpy())[0, 1]
    assert corr > 0.9
