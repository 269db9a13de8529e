"""Deletion, insertion and the FORGrad protocol score against closed forms, Quantus 0.6 and a
plain NumPy/one-image-at-a-time reference loop."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch import nn

from distributed_attr import zoo
from distributed_attr.methods import attribute
from distributed_attr.metrics import build_metric, evaluate, list_metrics
from distributed_attr.metrics.base import MetricContext
from distributed_attr.registry import RegistryError


def linear_model(c=1, h=12, w=12, classes=5, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes))
    return model.eval()


def linear_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    lin = model[1]
    return x.reshape(len(x), -1) @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def digits():
    model, _ = zoo.pretrained("digits_cnn")
    x, y = zoo.digits_dataset(32)
    return model, torch.from_numpy(x[:3]), torch.from_numpy(y[:3])


def test_ig_deletion_curve_is_the_exact_output_path_of_a_linear_model():
    model = linear_model(c=2)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 12, 12, generator=g)
    target = torch.tensor([0, 3, 4])
    # With a zero baseline IG of a linear model is exact: map = sum_c W[t] * x.
    ig = attribute(model, x, "integrated_gradients", target, steps=4)
    steps = 6
    out = evaluate(model, x, ig, "deletion", target, steps=steps, baseline="zero", output="logit", max_batch=5)
    sm = evaluate(model, x, ig, "deletion", target, steps=steps, baseline="zero", output="probability")

    w = model[1].weight.detach().double().numpy().reshape(5, 2, 144)
    xn = x.double().numpy().reshape(3, 2, 144)
    for i in range(3):
        contrib = (w[target[i]] * xn[i]).sum(0)  # exact IG per pixel
        order = np.argsort(-contrib, kind="stable")
        f_x = linear_logits(model, xn[i : i + 1])[0]
        for k in range(steps + 1):
            removed = order[: (k * 144) // steps]
            # logit path: f_t(x) minus the contributions removed so far (closed form)
            expected = f_x[target[i]] - contrib[removed].sum()
            assert out["curve"][i, k].item() == pytest.approx(expected, abs=1e-4)
            xk = xn[i].copy()
            xk[:, removed] = 0.0
            p = softmax(linear_logits(model, xk[None])[0])
            assert sm["curve"][i, k].item() == pytest.approx(p[target[i]], abs=1e-5)
        curve = out["curve"][i].double().numpy()
        assert out["auc"][i].item() == pytest.approx(np.trapezoid(curve, dx=1.0 / steps), abs=1e-5)


def test_deletion_matches_quantus_pixel_flipping(digits):
    import quantus

    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    steps = 8
    ours = evaluate(model, x, maps, "deletion", y, steps=steps, baseline=0.0, max_batch=7)
    metric = quantus.PixelFlipping(features_in_step=32 * 32 // steps, perturb_baseline=0.0,
                                   disable_warnings=True)
    ref = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                            a_batch=maps.numpy()[:, None], device="cpu", softmax=True))
    # Quantus's curve starts after the first step; ours also holds the unperturbed image.
    np.testing.assert_allclose(ours["curve"][:, 1:].numpy(), ref, atol=1e-5)
    with torch.no_grad():
        p0 = torch.softmax(model(x), 1)[torch.arange(3), y]
    np.testing.assert_allclose(ours["curve"][:, 0].numpy(), p0.numpy(), atol=1e-6)


def reference_curve(model, x, maps, target, steps, patch, baseline_img, mode, order="signed"):
    """One image and one step at a time, features ranked with NumPy."""
    n, c, h, w = x.shape
    curves = np.zeros((n, steps + 1))
    for i in range(n):
        m = maps[i].numpy().astype(np.float64)
        if order == "absolute":
            m = np.abs(m)
        rows, cols = -(-h // patch), -(-w // patch)
        patch_id = (np.arange(h)[:, None] // patch) * cols + (np.arange(w)[None, :] // patch)
        means = np.array([m[patch_id == p].mean() for p in range(rows * cols)])
        rank_of_patch = np.empty(rows * cols, dtype=int)
        rank_of_patch[np.argsort(-means, kind="stable")] = np.arange(rows * cols)
        n_features = rows * cols
        for k in range(steps + 1):
            chosen = rank_of_patch[patch_id] < (k * n_features) // steps
            start, end = (x[i], baseline_img[i]) if mode == "deletion" else (baseline_img[i], x[i])
            img = torch.where(torch.from_numpy(chosen)[None], end, start)
            with torch.no_grad():
                p = torch.softmax(model(img[None]), 1)[0, target[i]]
            curves[i, k] = p.item()
    return curves


def blur_reference(x: torch.Tensor, size=11, sigma=5.0) -> torch.Tensor:
    t = np.arange(size) - (size - 1) / 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    a = x.double().numpy()
    # torch's "reflect" padding is SciPy's "mirror" (the edge sample is not repeated)
    a = scipy.ndimage.correlate1d(a, k, axis=2, mode="mirror")
    a = scipy.ndimage.correlate1d(a, k, axis=3, mode="mirror")
    return torch.from_numpy(a).float()


def test_insertion_from_blur_and_patch_deletion_match_a_reference_loop(digits):
    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    blurred = blur_reference(x)
    ins = evaluate(model, x, maps, "insertion", y, steps=5, baseline="blur", patch=1)
    ref = reference_curve(model, x, maps, y, 5, 1, blurred, "insertion")
    np.testing.assert_allclose(ins["curve"].numpy(), ref, atol=2e-5)

    dele = evaluate(model, x, maps, "deletion", y, steps=4, baseline=0.25, patch=5, order="absolute")
    ref = reference_curve(model, x, maps, y, 4, 5, torch.full_like(x, 0.25), "deletion", order="absolute")
    np.testing.assert_allclose(dele["curve"].numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(dele["auc"].numpy(), np.trapezoid(ref, dx=0.25, axis=1), atol=2e-5)


def test_mean_baseline_uses_the_dataset_mean_or_each_image_mean(digits):
    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))
    with_mean = evaluate(model, x, maps, "deletion", y, steps=2, baseline="mean", dataset_mean=torch.tensor([0.3]))
    const = evaluate(model, x, maps, "deletion", y, steps=2, baseline=0.3)
    np.testing.assert_allclose(with_mean["curve"].numpy(), const["curve"].numpy(), atol=1e-6)
    own = evaluate(model, x, maps, "deletion", y, steps=2, baseline="mean")
    img_mean = x.mean(dim=(1, 2, 3))
    with torch.no_grad():
        end = torch.softmax(model(img_mean.view(3, 1, 1, 1).expand_as(x).contiguous()), 1)[torch.arange(3), y]
    np.testing.assert_allclose(own["curve"][:, -1].numpy(), end.numpy(), atol=1e-6)


def test_perfect_attribution_beats_random_and_reversed_on_deletion_and_insertion():
    model = linear_model(c=1, h=12, w=12)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 1, 12, 12, generator=g)
    target = torch.tensor([0, 1, 2, 3])
    w = model[1].weight.detach().view(5, 1, 12, 12)
    perfect = (w[target] * x).sum(1)
    for output in ("logit", "probability"):
        kw = dict(steps=12, output=output)
        scores = {}
        for name, maps in {"perfect": perfect, "reversed": -perfect}.items():
            scores[name] = (
                evaluate(model, x, maps, "deletion", target, baseline="zero", **kw)["auc"],
                evaluate(model, x, maps, "insertion", target, baseline="zero", **kw)["auc"],
            )
        rnd_del, rnd_ins = [], []
        for s in range(4):
            maps = torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(100 + s))
            rnd_del.append(evaluate(model, x, maps, "deletion", target, baseline="zero", **kw)["auc"])
            rnd_ins.append(evaluate(model, x, maps, "insertion", target, baseline="zero", **kw)["auc"])
        rnd_del, rnd_ins = torch.stack(rnd_del).mean(0), torch.stack(rnd_ins).mean(0)
        assert (scores["perfect"][0] < rnd_del).all() and (rnd_del < scores["reversed"][0]).all()
        assert (scores["perfect"][1] > rnd_ins).all() and (rnd_ins > scores["reversed"][1]).all()


def test_forgrad_protocol_is_insertion_from_blur_minus_deletion_to_zero(digits):
    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = evaluate(model, x, maps, "forgrad_protocol", y, steps=5, max_batch=4)
    ins = evaluate(model, x, maps, "insertion", y, steps=5, baseline="blur")
    dele = evaluate(model, x, maps, "deletion", y, steps=5, baseline="zero")
    np.testing.assert_allclose(out["insertion_curve"].numpy(), ins["curve"].numpy(), atol=1e-6)
    np.testing.assert_allclose(out["deletion_curve"].numpy(), dele["curve"].numpy(), atol=1e-6)
    np.testing.assert_allclose(out["score"].numpy(), (ins["auc"] - dele["auc"]).numpy(), atol=1e-6)


def test_bad_parameters_name_the_problem_and_the_valid_values():
    with pytest.raises(RegistryError, match="valid parameters: .*steps"):
        build_metric("deletion", {"stepz": 3})
    with pytest.raises(RegistryError, match="baseline"):
        build_metric("insertion", {"baseline": "black"})
    with pytest.raises(RegistryError, match="output"):
        build_metric("deletion", {"output": "sigmoid"})
    with pytest.raises(RegistryError, match="valid metrics"):
        build_metric("deletions")
    assert list_metrics()["deletion"]["higher_is_better"] is False


@pytest.mark.parametrize("name", ["deletion", "insertion", "forgrad_protocol", "mufidelity",
                                  "feature_detection", "sparseness", "complexity"])
def test_declared_outputs_match_what_evaluate_returns(name, digits):
    model, x, y = digits
    evaluators = {"vgg": zoo.pretrained("digits_vgg")[0]}
    metric = build_metric(name, {"n_subsets": 4} if name == "mufidelity" else {})
    ctx = MetricContext(evaluators=evaluators)
    maps = torch.randn(3, 32, 32)
    out = metric.evaluate(model, x, maps, y, ctx)
    spec = metric.outputs(ctx)
    assert set(out) == set(spec) and metric.score_output in spec
    assert spec[metric.score_output] == ((), ())
    for key, (dims, sizes) in spec.items():
        assert len(dims) == len(sizes)
        assert tuple(out[key].shape) == (3, *sizes), key
        assert out[key].dtype == torch.float32
        for dim, size in zip(dims, sizes):
            if dim in metric.coords(ctx):
                assert len(metric.coords(ctx)[dim]) == size
