"""The method registry as the pipeline and the public API use it: every method through
``compute_maps``, reproducibility across batch compositions, no weight gradients, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distributed_attr
from distributed_attr.methods import Context, build_method, compute_maps, resolve_layer
from distributed_attr.registry import RegistryError

ALL = [
    "saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "vargrad", "squaregrad",
    "guided_backprop", "gradcam", "gradcam_pp", "occlusion", "rise", "sobol", "soundness_saliency",
]
#: small parameters so every method runs in well under a second here
SMALL = {
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"samples": 3}, "vargrad": {"samples": 3}, "squaregrad": {"samples": 3},
    "occlusion": {"patch": 4, "stride": 4},
    "rise": {"masks": 20, "grid": 4},
    "sobol": {"grid": 2, "design": 4},
    "soundness_saliency": {"steps": 3, "references": 2},
}
RANDOM = ["smoothgrad", "vargrad", "squaregrad", "rise", "sobol", "soundness_saliency"]


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


def setup(n: int = 4):
    torch.manual_seed(0)
    model = TinyNet().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 12, 12, generator=g)
    refs = torch.rand(5, 1, 12, 12, generator=g)
    return model, x, torch.tensor([0, 1, 2, 1, 0, 2][:n]), refs


def test_every_method_is_registered_and_described():
    listed = distributed_attr.methods()
    assert set(ALL) <= set(listed)
    for name in ALL:
        info = listed[name]
        assert info["family"] in {"gradient", "prediction", "optimisation"}
        assert isinstance(info["params"], dict) and info["channel_rule"] and info["doc"]
    assert listed["rise"]["params"]["masks"] == 4000
    assert listed["gradcam"]["params"] == {"layer": None} and listed["gradcam"]["needs_layer"]
    assert [n for n in ALL if listed[n]["needs_references"]] == ["soundness_saliency"]
    assert listed["soundness_saliency"]["params"] == {
        "steps": 2000, "lr": 0.05, "l1": 2e-5, "tv": 0.01, "references": 10, "downsample": 4,
        "objective": "soundness",
    }


def test_every_method_runs_through_compute_maps_together():
    model, x, t, refs = setup()
    ctx = Context(layer=model.features, references=refs, max_batch=16)
    methods = [build_method(n, SMALL.get(n, {})) for n in ALL]
    maps = compute_maps(model, x, t, methods, ctx)
    assert list(maps) == ALL
    for name, m in maps.items():
        assert m.shape == (4, 12, 12) and m.dtype == torch.float32, name
        assert torch.isfinite(m).all() and m.abs().max() > 0, name
        if not build_method(name).signed:
            assert m.min() >= 0, name
        alone = compute_maps(model, x, t, [build_method(name, SMALL.get(name, {}))], ctx)[name]
        torch.testing.assert_close(m, alone, rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in model.parameters())  # input gradients only


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_reproduce_bit_for_bit_across_batch_compositions(name):
    model, x, t, refs = setup()
    params = SMALL[name]
    whole = compute_maps(model, x, t, [build_method(name, params)],
                         Context(seed=7, indices=torch.arange(4), references=refs, max_batch=64))[name]
    part = compute_maps(model, x[2:], t[2:], [build_method(name, params)],
                        Context(seed=7, indices=torch.tensor([2, 3]), references=refs, max_batch=64))[name]
    assert torch.equal(whole[2:], part)
    other_seed = compute_maps(model, x[2:], t[2:], [build_method(name, params)],
                              Context(seed=8, indices=torch.tensor([2, 3]), references=refs))[name]
    assert not torch.equal(other_seed, part)
    # the draws follow the global index, not the position in the batch
    moved = compute_maps(model, x[2:], t[2:], [build_method(name, params)],
                         Context(seed=7, indices=torch.tensor([0, 1]), references=refs))[name]
    assert not torch.equal(moved, part)


class ElementwiseNet(nn.Module):
    """Logit k = sum(tanh(x * w_k + b_k)): per-sample arithmetic only, so its outputs and input
    gradients are bitwise independent of the batch size (unlike BLAS/oneDNN convolutions, whose
    results for one sample can change in the last bits with the batch size)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 1, 12, 12, generator=g))
        self.b = nn.Parameter(torch.randn(3, 1, 12, 12, generator=g))

    def forward(self, x):
        return torch.stack([torch.tanh(x * self.w[k] + self.b[k]).sum(dim=(1, 2, 3)) for k in range(3)], dim=1)


@pytest.mark.parametrize("name", RANDOM)
def test_random_draws_do_not_depend_on_chunking(name):
    """A retried unit may run with a smaller max_batch (after an out-of-memory error, or on
    another actor): with a batch-size-invariant model the maps must not change by a bit."""
    _, x, t, refs = setup()
    model = ElementwiseNet()
    params = SMALL[name]
    big = compute_maps(model, x, t, [build_method(name, params)], Context(seed=1, references=refs, max_batch=64))
    small = compute_maps(model, x, t, [build_method(name, params)], Context(seed=1, references=refs, max_batch=3))
    assert torch.equal(big[name], small[name])


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
        distributed_attr.attribute(model, x, "lime")
    with pytest.raises(RegistryError, match=r"unknown parameter\(s\) \['mask'\].*masks=4000"):
        distributed_attr.attribute(model, x, "rise", mask=10)
    with pytest.raises(RegistryError, match="objective.*'kadir'"):
        build_method("soundness_saliency", {"objective": "entropy"})
    with pytest.raises(RegistryError, match="steps must be >= 1"):
        build_method("integrated_gradients", {"steps": 0})
