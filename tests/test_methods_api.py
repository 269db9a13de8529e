"""The method registry as the pipeline and the public API use it: every method through
``compute_maps``, reproducibility across batch compositions, no weight gradients, errors."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import distributed_attr
from distributed_attr.methods import (
    METHODS,
    Context,
    build_method,
    compute_maps,
    resolve_layer,
)
from distributed_attr.registry import RegistryError

#: every registered method: the tests that cover "every method" take their cases from here, so a
#: newly registered method is tested without being added to a list
NAMES = list(METHODS)
#: the built-in methods, only to check that none of them disappears from the registry
BUILTIN = [
    "saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad", "squaregrad",
    "guided_backprop", "gradcam", "gradcam_pp", "occlusion", "rise", "sobol", "soundness_saliency",
]
#: small values for the parameters that set a method's work, by parameter name: a method gets the
#: ones its ``Params`` declares, so every method runs in well under a second here
FAST_VALUES = {
    "steps": 3, "samples": 3, "n_samples": 3, "masks": 20, "n_masks": 20, "design": 4,
    "backgrounds": 2, "grid": 3, "patch": 4, "stride": 4, "iterations": 3, "n_iter": 3,
}
#: parameters whose count is a number of random draws: a method declaring one must use the seed
SAMPLING = {"samples", "n_samples", "masks", "n_masks", "design", "backgrounds"}
#: most passes per image (``Method.cost``) a method may take with its fast parameters here
MAX_COST = 100
#: an integer parameter whose default is above this must have a fast value in ``FAST_VALUES``,
#: unless it names a size rather than an amount of work
MAX_INT_DEFAULT = 16
NOT_WORK = {"l1_reference_size"}


def param_fields(name: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(METHODS.get(name).Params)}


def fast(name: str) -> dict:
    """The method's fast parameters, derived from the parameters it declares."""
    return {k: v for k, v in FAST_VALUES.items() if k in param_fields(name)}


def samples_randomly(name: str) -> bool:
    """Whether the method declares a number of random draws among its parameters."""
    return bool(SAMPLING & set(param_fields(name)))


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.features(x)).mean(dim=(2, 3)))


class TinyViT(nn.Module):
    """torchvision's VisionTransformer on the same 1-channel 12 x 12 images (3 x 3 patches of 4 px,
    a class token), for the methods that read attention; its head starts random (torchvision's
    starts at zero)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import VisionTransformer

        self.vit = VisionTransformer(image_size=12, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8,
                                     mlp_dim=16, num_classes=3)
        self.vit.conv_proj = nn.Conv2d(1, 8, kernel_size=4, stride=4)
        nn.init.normal_(self.vit.heads.head.weight, std=0.5)

    def forward(self, x):
        return self.vit(x)


def model_for(name: str, cnn: nn.Module) -> nn.Module:
    """The CNN, or for a method that does not apply to it, the tiny ViT."""
    if METHODS.get(name).unsupported_reason(cnn) is None:
        return cnn
    torch.manual_seed(0)
    vit = TinyViT().eval()
    assert METHODS.get(name).unsupported_reason(vit) is None, name
    return vit


def setup(n: int = 4):
    torch.manual_seed(0)
    model = TinyNet().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 12, 12, generator=g)
    refs = torch.rand(5, 1, 12, 12, generator=g)
    return model, x, torch.tensor([0, 1, 2, 1, 0, 2][:n]), refs


def test_every_method_is_registered_and_described():
    listed = distributed_attr.list_methods()
    assert set(BUILTIN) <= set(listed) and list(listed) == NAMES
    for name in NAMES:
        info = listed[name]
        assert info["family"] in {"gradient", "prediction", "optimisation"}, name
        assert isinstance(info["params"], dict) and info["channel_rule"] and info["doc"], name
    assert listed["rise"]["params"]["masks"] == 4000
    assert listed["gradcam"]["params"] == {"layer": None, "reshape": "auto"} and listed["gradcam"]["needs_layer"]
    assert [n for n in BUILTIN if listed[n]["needs_references"]] == ["soundness_saliency"]
    assert listed["soundness_saliency"]["params"] == {
        "steps": 2000, "lr": 0.05, "l1": 2e-5, "tv": 0.01, "l1_reference_size": 224, "backgrounds": 10,
        "downsample": 4, "objective": "soundness",
    }


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_fast_parameters_known_to_this_suite(name):
    """Every test here runs each registered method with ``fast(name)``: a method whose work is
    set by a parameter this suite does not know would make the suite slow, so it fails here
    instead (add the parameter's small value to ``FAST_VALUES``)."""
    m = build_method(name, fast(name))
    kwargs = {k: 12 for k in ("height", "width") if k in inspect.signature(m.cost).parameters}
    assert m.cost(**kwargs) <= MAX_COST, (name, fast(name), m.cost(**kwargs))
    big = [f.name for f in param_fields(name).values()
           if type(f.default) is int and f.default > MAX_INT_DEFAULT and f.name not in FAST_VALUES.keys() | NOT_WORK]
    assert not big, f"{name}: no fast value known for {big}; add one to FAST_VALUES"


def test_every_method_runs_through_compute_maps_together():
    cnn, x, t, refs = setup()
    ctx = Context(layer=cnn.features, references=refs, budget=16)
    maps = {}
    for kind in ("cnn", "vit"):  # every method on the model it applies to, all of them in one call
        names = [n for n in NAMES if (model_for(n, cnn) is cnn) == (kind == "cnn")]
        model = cnn if kind == "cnn" else model_for(names[0], cnn) if names else None
        if names:
            maps.update(compute_maps(model, x, t, [build_method(n, fast(n)) for n in names], ctx))
            assert all(p.grad is None for p in model.parameters())
    assert sorted(maps) == sorted(NAMES)
    for name, m in maps.items():
        model = model_for(name, cnn)
        assert m.shape == (4, 12, 12) and m.dtype == torch.float32, name
        assert torch.isfinite(m).all() and m.abs().max() > 0, name
        if not build_method(name).signed:
            assert m.min() >= 0, name
        alone = compute_maps(model, x, t, [build_method(name, fast(name))], ctx)[name]
        torch.testing.assert_close(m, alone, rtol=1e-5, atol=1e-7, msg=name)
        if model is not cnn:  # a method that does not apply to the CNN says so, naming itself
            with pytest.raises(ValueError, match=name):
                compute_maps(cnn, x, t, [build_method(name, fast(name))], ctx)


@pytest.mark.parametrize("name", NAMES)
def test_maps_reproduce_bit_for_bit_across_batch_compositions(name):
    """Random methods draw per (seed, method, global image index); deterministic ones ignore the
    seed and the indices. A method that declares a number of random draws must be random."""
    cnn, x, t, refs = setup()
    model = model_for(name, cnn)
    params = fast(name)

    def run(xs, ts, seed, indices, **kw):
        ctx = Context(seed=seed, indices=indices, layer=cnn.features, references=refs, **kw)
        return compute_maps(model, xs, ts, [build_method(name, params)], ctx)[name]

    whole = run(x, t, 7, torch.arange(4), budget=64)
    part = run(x[2:], t[2:], 7, torch.tensor([2, 3]), budget=64)
    assert torch.equal(whole[2:], part)
    other_seed = run(x[2:], t[2:], 8, torch.tensor([2, 3]))
    # the draws follow the global index, not the position in the batch
    moved = run(x[2:], t[2:], 7, torch.tensor([0, 1]))
    if samples_randomly(name) or not torch.equal(other_seed, part):
        assert not torch.equal(other_seed, part), f"{name} declares random draws but ignores the seed"
        assert not torch.equal(moved, part)
    else:  # deterministic: neither the seed nor the indices change a bit
        assert torch.equal(moved, part)


class ElementwiseNet(nn.Module):
    """Logit k = sum(tanh(x * w_k + b_k)): per-sample arithmetic only, so its outputs and input
    gradients are bitwise independent of the batch size (unlike BLAS/oneDNN convolutions, whose
    results for one sample can change in the last bits with the batch size). The tanh is a
    module whose output (N, 3, H, W) is the layer CAM methods hook."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 1, 12, 12, generator=g))
        self.b = nn.Parameter(torch.randn(3, 1, 12, 12, generator=g))
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(x * self.w[:, 0] + self.b[:, 0]).sum(dim=(2, 3))


@pytest.mark.parametrize("name", NAMES)
def test_maps_do_not_depend_on_chunking(name):
    """A retried unit may run with a smaller max_batch (after an out-of-memory error, or on
    another actor): with a batch-size-invariant model the maps must not change by a bit."""
    cnn, x, t, refs = setup()
    model = ElementwiseNet() if model_for(name, cnn) is cnn else model_for(name, cnn)
    params = fast(name)

    def run(max_batch):
        ctx = Context(seed=1, layer=getattr(model, "act", None), references=refs, budget=max_batch)
        return compute_maps(model, x, t, [build_method(name, params)], ctx)[name]

    if isinstance(model, ElementwiseNet):
        assert torch.equal(run(64), run(3))
    else:  # the tiny ViT is not batch-size invariant itself: its own logits for a one-image batch
        # differ in the last bits from those inside a batch of four
        torch.testing.assert_close(run(64), run(3), rtol=1e-5, atol=1e-7)


def test_attribute_public_api():
    model, x, t, refs = setup()
    pred = model(x).argmax(dim=1)
    ctx = Context(layer=resolve_layer(model, None, x))
    for name in ["saliency", "gradcam"]:
        ours = distributed_attr.attribute(model, x, name)
        ref = compute_maps(model, x, pred, [build_method(name)], ctx)[name]
        assert torch.equal(ours, ref) and ours.device == x.device
    by_name = distributed_attr.attribute(model, x, "gradcam", target=1, layer="features.0")
    by_module = compute_maps(model, x, torch.ones(4, dtype=torch.int64), [build_method("gradcam")],
                             Context(layer=model.features[0]))["gradcam"]
    assert torch.equal(by_name, by_module)
    rise = distributed_attr.attribute(model, x, "rise", target=[0, 1, 2, 0], seed=3, masks=10, grid=3)
    assert rise.shape == (4, 12, 12)


def test_unknown_method_or_parameter_lists_the_valid_ones():
    model, x, _, _ = setup()
    with pytest.raises(RegistryError, match="valid methods: .*'occlusion'.*'sobol'"):
        distributed_attr.attribute(model, x, "no_such_method")
    with pytest.raises(RegistryError, match=r"unknown parameter\(s\) \['mask'\].*masks=4000"):
        distributed_attr.attribute(model, x, "rise", mask=10)
    with pytest.raises(RegistryError, match="objective.*'kadir'"):
        build_method("soundness_saliency", {"objective": "entropy"})
    with pytest.raises(RegistryError, match="steps must be >= 1"):
        build_method("integrated_gradients", {"steps": 0})
