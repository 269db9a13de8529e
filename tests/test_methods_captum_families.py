"""The Captum bridges (``methods/captum_families.py``) against Captum itself: every map equals
Captum's own result on the same model, inputs, targets, baselines and feature mask (reduced over
channels the documented way): to rounding where the method is deterministic, and under the same
per-image seeding of the global generators for the sampled ones. Plus what the bridge adds:
chunking, the functional-ReLU limitation of DeepLIFT, parameters, costs and the CLI listing.
(Batch-composition independence comes from tests/test_methods_api.py, which covers every
registered method.)"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum import attr as captum_attr
from captum._utils.models.linear_model import SkLearnLasso, SkLearnRidge
from torch import nn

from distributed_attr.cli import main
from distributed_attr.methods import Context, build_method, list_methods
from distributed_attr.methods.base import image_seed
from distributed_attr.methods.captum_families import (
    each_image,
    patch_mask,
    unhooked_nonlinearities,
)
from distributed_attr.registry import RegistryError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # the notices Captum's DeepLIFT prints on every call of the oracles
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks", "ignore:Input Tensor 0 did not"),
]

BRIDGED = ["deeplift", "deeplift_shap", "gradient_shap", "kernel_shap", "lime", "feature_ablation",
           "shapley_value_sampling"]
H = W = 12


class ReluNet(nn.Module):
    """Every nonlinearity an ``nn.Module``, each used once: what Captum's DeepLIFT needs. With
    ``pool=False`` the max-pooling is a strided subsampling instead (Captum's max-pool rule does
    not keep summation-to-delta exactly; its ReLU rule does)."""

    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.fc = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        h = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.fc(self.subsample(h).flatten(1))

    def subsample(self, h):
        return h if isinstance(self.pool, nn.MaxPool2d) else h[:, :, ::2, ::2]


class FunctionalReluNet(ReluNet):
    """The same weights, with the ReLUs called as functions."""

    def forward(self, x):
        h = self.pool(F.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(self.subsample(h).flatten(1))


class ReusedReluNet(ReluNet):
    """One ReLU module called twice (as torchvision's ResNet blocks do)."""

    def forward(self, x):
        h = self.pool(self.act1(self.conv2(self.act1(self.conv1(x)))))
        return self.fc(self.subsample(h).flatten(1))


def setup(n: int = 5, cls=ReluNet, pool: bool = True):
    torch.manual_seed(0)
    model = cls(pool).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, H, W, generator=g, dtype=torch.float64) * 2 - 1
    refs = torch.rand(6, 3, H, W, generator=g, dtype=torch.float64) * 2 - 1
    target = torch.tensor([0, 1, 2, 1, 0, 2, 1][:n])
    return model, x, target, refs


def ours(model, x, target, name, *, refs=None, seed=0, indices=None, max_batch=256, **params):
    """The method's own maps, in the working dtype (float64 here; ``compute_maps`` would round
    them to float32), so that they can be compared with Captum's to float64 rounding."""
    ctx = Context(seed=seed, indices=indices, references=refs, budget=max_batch)
    return build_method(name, params).attribute(model, x, target, ctx)


def grid_mask(patch: int) -> torch.Tensor:
    """The documented superpixels, written out independently: square (i, j) holds rows
    i*patch..(i+1)*patch-1 and columns j*patch..; numbered row-major; (1, 1, H, W)."""
    per_row = -(-W // patch)
    mask = torch.empty(H, W, dtype=torch.int64)
    for r in range(H):
        for c in range(W):
            mask[r, c] = (r // patch) * per_row + c // patch
    return mask.view(1, 1, H, W)


def seeded(seed: int) -> None:
    """Seed the global generators Captum draws from, as the bridge documents it."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def same(a, b, tol=1e-12):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ superpixels


def test_patch_mask_is_a_row_major_grid_cropped_at_the_border():
    m = patch_mask(5, 7, 3)
    assert m.tolist() == [
        [0, 0, 0, 1, 1, 1, 2],
        [0, 0, 0, 1, 1, 1, 2],
        [0, 0, 0, 1, 1, 1, 2],
        [3, 3, 3, 4, 4, 4, 5],
        [3, 3, 3, 4, 4, 4, 5],
    ]
    assert torch.equal(patch_mask(H, W, 5).view(1, 1, H, W), grid_mask(5))


# --------------------------------------------------------------------------------- DeepLIFT


@pytest.mark.parametrize("baseline, pool", [(0.0, True), (-0.3, True), (0.0, False), (-0.3, False)])
def test_deeplift_equals_captum_and_sums_to_the_output_difference(baseline, pool):
    model, x, t, _ = setup(pool=pool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no functional nonlinearity to warn about
        mine = ours(model, x, t, "deeplift", baseline=baseline)
        chunked = ours(model, x, t, "deeplift", baseline=baseline, max_batch=3)  # 1 image per pass
    ref = captum_attr.DeepLift(model).attribute(x.clone(), baselines=baseline, target=t).sum(dim=1)
    same(mine, ref)
    same(chunked, ref)
    with torch.no_grad():
        out_x = model(x).gather(1, t.view(-1, 1)).squeeze(1)
        out_b = model(torch.full_like(x, baseline)).gather(1, t.view(-1, 1)).squeeze(1)
    if not pool:  # summation-to-delta: exact for the ReLU rule (Captum's max-pool rule is not)
        same(mine.sum(dim=(1, 2)), out_x - out_b, tol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_deeplift_with_functional_relus_is_captums_result_and_warns():
    """Captum's DeepLIFT hooks nn.ReLU modules only: F.relu keeps its plain gradient. The bridge
    returns what Captum returns, warns, and the map no longer sums to f(x) - f(b)."""
    modules, x, t, _ = setup(pool=False)
    functional = FunctionalReluNet(pool=False).double().eval()
    functional.load_state_dict(modules.state_dict())
    assert unhooked_nonlinearities(functional, x[:1]) == {"relu": 2}
    assert unhooked_nonlinearities(modules, x[:1]) == {}
    with pytest.warns(UserWarning, match=r"deeplift: .*does not hook \(relu x2\)"):
        mine = ours(functional, x, t, "deeplift")
    ref = captum_attr.DeepLift(functional).attribute(x.clone(), baselines=0.0, target=t).sum(dim=1)
    same(mine, ref)
    with torch.no_grad():
        delta = (functional(x) - functional(torch.zeros_like(x))).gather(1, t.view(-1, 1)).squeeze(1)
    gap = (mine.sum(dim=(1, 2)) - delta).abs().max()
    assert gap > 1e-3, gap  # not DeepLIFT: summation-to-delta fails
    same(ours(modules, x, t, "deeplift").sum(dim=(1, 2)), delta, tol=1e-10)  # same weights, modules


def test_deeplift_refuses_a_reused_relu_module_by_name():
    model, x, t, refs = setup(cls=ReusedReluNet)
    with pytest.raises(ValueError, match=r"reused: act1 \(ReLU\) x2"):
        ours(model, x, t, "deeplift")
    with pytest.raises(ValueError, match=r"reused: act1 \(ReLU\) x2"):
        ours(model, x, t, "deeplift_shap", refs=refs, backgrounds=2)


def test_deeplift_shap_equals_captum_on_each_images_backgrounds():
    model, x, t, refs = setup(pool=False)
    seed, idx = 3, torch.tensor([10, 11, 12, 13, 14])
    mine = ours(model, x, t, "deeplift_shap", refs=refs, seed=seed, indices=idx, backgrounds=3)
    for i in range(len(x)):
        g = torch.Generator().manual_seed(image_seed(seed, "deeplift_shap", int(idx[i])))
        picks = torch.randperm(len(refs), generator=g)[:3].sort().values
        ref = captum_attr.DeepLiftShap(model).attribute(x[i:i + 1].clone(), baselines=refs[picks], target=int(t[i]))
        same(mine[i], ref[0].sum(dim=0))
    # all the backgrounds: no draw left, one batched Captum call is the oracle
    everything = ours(model, x, t, "deeplift_shap", refs=refs, seed=seed, indices=idx, backgrounds=6)
    ref = captum_attr.DeepLiftShap(model).attribute(x.clone(), baselines=refs, target=t).sum(dim=1)
    same(everything, ref)
    same(ours(model, x, t, "deeplift_shap", refs=refs, seed=9, backgrounds=6), ref)
    with torch.no_grad():
        out = model(x).gather(1, t.view(-1, 1)).squeeze(1)
        base = model(refs)[:, t].mean(dim=0)
    same(everything.sum(dim=(1, 2)), out - base, tol=1e-10)


# ----------------------------------------------------------------------------- GradientSHAP


@pytest.mark.parametrize("noise_level", [0.0, 0.1])
def test_gradient_shap_equals_captum_under_the_same_seed(noise_level):
    model, x, t, refs = setup()
    seed, idx = 5, torch.tensor([7, 3, 9, 0, 21])
    torch.manual_seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy())
    mine = ours(model, x, t, "gradient_shap", refs=refs, seed=seed, indices=idx, samples=8, noise_level=noise_level)
    chunked = ours(model, x, t, "gradient_shap", refs=refs, seed=seed, indices=idx, samples=8,
                   noise_level=noise_level, max_batch=3)
    # the global generators are as they were
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    for i in range(len(x)):
        seeded(image_seed(seed, "gradient_shap", int(idx[i])))
        stdev = noise_level * float(x[i].max() - x[i].min())
        ref = captum_attr.GradientShap(model).attribute(
            x[i:i + 1].clone(), baselines=refs, n_samples=8, stdevs=stdev, target=int(t[i])
        )[0].sum(dim=0)
        same(mine[i], ref)
        same(chunked[i], ref)  # the gradient step split into passes of 3 points: same draws
    assert not torch.equal(mine, ours(model, x, t, "gradient_shap", refs=refs, seed=seed + 1, indices=idx,
                                      samples=8, noise_level=noise_level))


# ----------------------------------------------------------------- perturbation families


@pytest.mark.parametrize("patch", [4, 5])
@pytest.mark.parametrize("output", ["logit", "probability"])
def test_feature_ablation_equals_captum(patch, output):
    model, x, t, _ = setup()
    forward = model if output == "logit" else (lambda z: torch.softmax(model(z), dim=1))
    ref = captum_attr.FeatureAblation(forward).attribute(
        x, baselines=0.25, target=t, feature_mask=grid_mask(patch)
    )
    assert torch.equal(ref[:, 0], ref[:, 2])  # channels ablated together: channel 0 is the map
    for max_batch in (256, 3):  # one Captum call with 51 ablations per pass; chunks of 3 images
        mine = ours(model, x, t, "feature_ablation", patch=patch, baseline=0.25, output=output, max_batch=max_batch)
        same(mine, ref[:, 0])


SAMPLED = {
    "kernel_shap": (lambda f, p: captum_attr.KernelShap(f), {"samples": 40}),
    "lime": (lambda f, p: captum_attr.Lime(
        f, interpretable_model=SkLearnRidge(alpha=p.get("regularisation", 1.0)) if p.get("surrogate", "ridge") == "ridge"
        else SkLearnLasso(alpha=p["regularisation"])), {"samples": 40}),
    "shapley_value_sampling": (lambda f, p: captum_attr.ShapleyValueSampling(f), {"samples": 4}),
}


@pytest.mark.parametrize("name, extra", [
    ("kernel_shap", {}),
    ("kernel_shap", {"patch": 5, "output": "probability", "baseline": 0.5}),
    ("lime", {}),
    ("lime", {"surrogate": "lasso", "regularisation": 0.001, "patch": 5}),
    ("shapley_value_sampling", {}),
    ("shapley_value_sampling", {"patch": 5, "output": "probability", "baseline": -1.0}),
])
def test_sampled_perturbation_methods_equal_captum_under_the_same_seed(name, extra):
    """Captum's own call on one image after seeding the global generators with the image's seed
    (its default perturbations_per_eval=1 too: the bridge's batched evaluations draw the same)."""
    model, x, t, _ = setup(n=3)
    make, params = SAMPLED[name]
    params = {"patch": 4, **params, **extra}
    patch, baseline, output = params["patch"], params.get("baseline", 0.0), params.get("output", "logit")
    forward = model if output == "logit" else (lambda z: torch.softmax(model(z), dim=1))
    seed, idx = 11, torch.tensor([4, 8, 15])
    mine = ours(model, x, t, name, seed=seed, indices=idx, max_batch=16, **params)
    for i in range(len(x)):
        seeded(image_seed(seed, name, int(idx[i])))
        ref = make(forward, params).attribute(
            x[i:i + 1], baselines=baseline, target=int(t[i]), feature_mask=grid_mask(patch),
            n_samples=params["samples"],
        )
        assert torch.equal(ref[0, 0], ref[0, 1])
        same(mine[i], ref[0, 0], tol=1e-6)  # LIME / Kernel SHAP fit in float32 inside Captum
    assert mine.abs().amax(dim=(1, 2)).min() > 0
    again = ours(model, x[1:], t[1:], name, seed=seed, indices=idx[1:], max_batch=2, **params)
    assert torch.equal(again, mine[1:])  # other batch, other pass size: the same bits
    assert not torch.equal(ours(model, x, t, name, seed=seed + 1, indices=idx, **params), mine)


def test_shapley_value_sampling_is_efficient():
    """Every permutation's marginal contributions sum to f(x) - f(baseline), so the map's
    per-superpixel values do too (a property, independent of Captum)."""
    model, x, t, _ = setup(n=2)
    mine = ours(model, x, t, "shapley_value_sampling", samples=2, patch=6)
    per_feature = mine[:, ::6, ::6].sum(dim=(1, 2))
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t.view(-1, 1)).squeeze(1)
    same(per_feature, delta, tol=1e-6)


# ----------------------------------------------------------------- contract and plumbing


def test_registered_described_and_listed_by_the_cli(capsys):
    listed = list_methods()
    assert set(BRIDGED) <= set(listed)
    assert [n for n in BRIDGED if listed[n]["needs_references"]] == ["deeplift_shap", "gradient_shap"]
    assert {n: listed[n]["family"] for n in BRIDGED} == {
        "deeplift": "gradient", "deeplift_shap": "gradient", "gradient_shap": "gradient",
        "kernel_shap": "prediction", "lime": "prediction", "feature_ablation": "prediction",
        "shapley_value_sampling": "prediction",
    }
    assert listed["lime"]["params"] == {"samples": 1000, "patch": 8, "baseline": 0.0, "output": "logit",
                                        "surrogate": "ridge", "regularisation": 1.0, "kernel_width": 1.0}
    assert listed["deeplift"]["channel_rule"].startswith("sum over channels")
    assert listed["feature_ablation"]["channel_rule"].startswith("none needed")
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in BRIDGED:
        assert name in lines, name
        assert lines[name].split()[1] == listed[name]["family"]
    assert "samples=25, patch=8, baseline=0.0" in lines["shapley_value_sampling"]
    assert "backgrounds=10" in lines["deeplift_shap"]


def test_costs_count_passes_per_image():
    assert build_method("deeplift").cost() == 2  # the image and its baseline, one pass
    assert build_method("deeplift_shap", {"backgrounds": 4}).cost() == 8
    assert build_method("gradient_shap", {"samples": 7}).cost() == 7
    assert build_method("kernel_shap", {"samples": 300}).cost() == 300
    assert build_method("lime").cost() == 1000
    assert build_method("feature_ablation").cost() == 28 * 28 + 1  # 8-px squares at 224 px
    assert build_method("feature_ablation", {"patch": 5}).cost(12, 12) == 10
    assert build_method("shapley_value_sampling").cost(32, 32) == 25 * 16 + 1
    assert {build_method(n).cost_unit for n in BRIDGED[:3]} == {"forward+backward"}
    assert {build_method(n).cost_unit for n in BRIDGED[3:]} == {"forward"}


def test_bad_parameters_and_inputs_are_named():
    for name, params, msg in [
        ("kernel_shap", {"samples": 0}, "samples must be >= 1"),
        ("lime", {"patch": 0}, "patch must be >= 1"),
        ("lime", {"surrogate": "elastic"}, r"surrogate.*'ridge', 'lasso'"),
        ("lime", {"regularisation": 0.0}, "regularisation and kernel_width must be > 0"),
        ("lime", {"alpha": 0.0}, "regularisation and kernel_width must be > 0"),  # the former name reads
        ("deeplift_shap", {"backgrounds": 1}, "backgrounds must be >= 2"),
        ("gradient_shap", {"noise_level": -1.0}, "noise_level must be >= 0"),
        ("feature_ablation", {"stride": 2}, r"unknown parameter\(s\) \['stride'\].*patch=8"),
    ]:
        with pytest.raises(RegistryError, match=msg):
            build_method(name, params)
    model, x, t, refs = setup(n=2)
    for name in ("deeplift_shap", "gradient_shap"):
        with pytest.raises(ValueError, match=f"{name} needs background images"):
            ours(model, x, t, name)
    with pytest.raises(ValueError, match="backgrounds=10 exceeds the 6 reference images"):
        ours(model, x, t, "deeplift_shap", refs=refs)
    with pytest.raises(ValueError, match="fewer than 2 superpixels"):
        ours(model, x, t, "kernel_shap", patch=12, samples=3)


def test_autocast_runs_and_deeplift_warns_that_it_runs_without_it():
    model, x, t, refs = setup(n=2)
    model, x, refs = model.float(), x.float(), refs.float()
    for name, params in [("deeplift", {}), ("deeplift_shap", {"backgrounds": 2}), ("gradient_shap", {"samples": 3}),
                         ("kernel_shap", {"samples": 8, "patch": 4}), ("lime", {"samples": 8, "patch": 4}),
                         ("feature_ablation", {"patch": 4}), ("shapley_value_sampling", {"samples": 2, "patch": 4})]:
        ctx = Context(references=refs, autocast=torch.bfloat16)
        plain = build_method(name, params).attribute(model, x, t, Context(references=refs))
        if name.startswith("deeplift"):
            with pytest.warns(UserWarning, match=f"{name}: runs without autocast"):
                half = build_method(name, params).attribute(model, x, t, ctx)
            assert torch.equal(half, plain)
        else:
            half = build_method(name, params).attribute(model, x, t, ctx)
            assert half.dtype == torch.float32 and torch.isfinite(half).all()
            assert (half - plain).abs().max() < 0.5 * plain.abs().max(), name  # bfloat16 rounding only


def test_out_of_memory_halves_the_budget_and_redoes_the_image():
    ctx = Context(budget=8)
    calls = []

    def fn(i):
        calls.append((i, ctx.max_batch))
        if i == 1 and ctx.max_batch > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.tensor(float(i))

    assert each_image(fn, 3, ctx).tolist() == [0.0, 1.0, 2.0]
    assert calls == [(0, 8), (1, 8), (1, 4), (1, 2), (2, 2)] and ctx.max_batch == 2
    with pytest.raises(RuntimeError, match="shape mismatch"):
        each_image(lambda i: (_ for _ in ()).throw(RuntimeError("shape mismatch")), 1, ctx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_maps_match_captum_there_and_do_not_depend_on_the_batch():
    model, x, t, refs = setup()
    model, x, t, refs = model.cuda(), x.cuda(), t.cuda(), refs.cuda()
    idx = torch.arange(5)
    for name, params in [("gradient_shap", {"samples": 8, "noise_level": 0.1}), ("lime", {"samples": 30}),
                         ("deeplift", {}), ("feature_ablation", {})]:
        whole = ours(model, x, t, name, refs=refs, seed=2, indices=idx, **params)
        part = ours(model, x[3:], t[3:], name, refs=refs, seed=2, indices=idx[3:], **params)
        assert whole.device == x.device, name
        if name in ("gradient_shap", "lime"):  # one Captum call per image: the same computation
            assert torch.equal(whole[3:], part), name
        else:  # batched: cuDNN may pick other kernels for another batch size
            same(whole[3:], part, tol=1e-10)
    seeded(image_seed(2, "gradient_shap", 0))
    with torch.random.fork_rng(devices=[0]):  # the noise is drawn by the device's generator
        torch.cuda.manual_seed(image_seed(2, "gradient_shap", 0))
        ref = captum_attr.GradientShap(model).attribute(
            x[:1].clone(), baselines=refs, n_samples=8, stdevs=0.1 * float(x[0].max() - x[0].min()), target=int(t[0])
        )[0].sum(dim=0)
    same(ours(model, x[:1], t[:1], "gradient_shap", refs=refs, seed=2, indices=idx[:1], samples=8,
              noise_level=0.1), ref)
    assert math.isfinite(float(whole.sum()))


def test_deeplift_shap_out_of_memory_is_raised_at_once_and_leaves_the_budget():
    """Its pass (an image with its backgrounds) does not shrink with the budget: halving the
    budget and redoing the same pass, down to one sample, only delayed the error and left the
    replica's budget at 1."""
    model, x, t, refs = setup()
    passes = []

    def forward_pre(module, args):
        passes.append(1)
        if len(passes) > 2:  # the first passes check the model (check_deeplift_model)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = model.register_forward_pre_hook(forward_pre)
    try:
        ctx = Context(references=refs, budget=8)
        with pytest.raises(RuntimeError, match="out of memory"):
            build_method("deeplift_shap", {"backgrounds": 2}).attribute(model, x, t, ctx)
    finally:
        handle.remove()
    assert ctx.max_batch == 8 and len(passes) == 3
