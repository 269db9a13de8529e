"""Max- and Avg-Sensitivity: the closed form of an explanation linear in x, Quantus 0.6 fed the
same perturbed inputs (recorded from our run and replayed through its ``perturb_func``), and
per-image draws that do not depend on the batch or the chunking."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_attr.methods import attribute
from distributed_attr.metrics import build_metric, list_metrics
from distributed_attr.metrics.base import MetricContext
from distributed_attr.registry import RegistryError

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """An explanation function that keeps every input it is asked to explain."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x, target):
        self.inputs.append(x.detach().clone())
        return self.fn(x, target)

    def by_image(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """(N, samples, C, H, W): each recorded input given to the image it perturbs (the nearest
        in L-inf), samples in the order they were explained."""
        rows = torch.cat(self.inputs)
        dist = (rows[:, None] - x[None]).abs().flatten(2).amax(-1)  # (rows, N)
        owner = dist.argmin(1)
        out = torch.stack([rows[owner == i] for i in range(x.shape[0])])
        assert out.shape[1] == samples
        return out


def run(name, model, x, maps, target, explain, *, seed=0, indices=None, max_batch=256, **params):
    metric = build_metric(name, params)
    ctx = MetricContext(seed=seed, indices=indices, budget=max_batch, explain=explain)
    return metric.evaluate(model, x, maps, target, ctx)["sensitivity"]


def linear_model(c=2, h=12, w=12, classes=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes)).eval()


def small_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 10 * 10, 4)).eval()


def gxi(model):
    return lambda x, t: attribute(model, x, "gradient_x_input", t)


def test_linear_explanation_has_the_closed_form_sensitivity():
    """Gradient x Input of a linear model is a(x) = sum_c W_t,c x_c, linear in x: the change for
    noise d is sum_c W_t,c d_c, whatever x. Exact per sample given the draws; its mean square over
    the draws is lower_bound^2 / 3 * sum W_t^2 (d uniform in [-b, b])."""
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 12, generator=g)
    target = torch.tensor([0, 2, 4])
    maps = gxi(model)(x, target)
    wt = model[1].weight.detach().view(5, 2, 12, 12)[target].double()  # (3, C, H, W)
    samples, bound = 64, 0.1
    rec = Recorder(gxi(model))
    mx = run("max_sensitivity", model, x, maps, target, rec, samples=samples, lower_bound=bound, max_batch=50)
    noise = (rec.by_image(x, samples) - x[:, None]).double()  # (3, S, C, H, W)
    assert noise.abs().max() <= bound + 1e-7
    assert abs(noise.mean().item()) < 0.01 * bound and noise.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    a = (wt * x.double()).sum(1).flatten(1)  # the map, (3, H*W)
    change = (wt[:, None] * noise).sum(2).flatten(2)  # (3, S, H*W)
    per_sample = change.norm(dim=-1) / a.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(mx.double(), per_sample.amax(1), rtol=1e-5, atol=0)
    avg = run("avg_sensitivity", model, x, maps, target, gxi(model), samples=samples, lower_bound=bound)
    torch.testing.assert_close(avg.double(), per_sample.mean(1), rtol=1e-5, atol=0)
    expected = (bound**2 / 3 * (wt**2).sum((1, 2, 3))).sqrt() / a.norm(dim=-1)
    torch.testing.assert_close(avg.double(), expected, rtol=0.05, atol=0)
    assert (mx >= avg).all()  # the same draws for both
    # a map that does not depend on x is not sensitive; a scaled explanation neither scales
    fixed = lambda xb, t: maps[0].expand(len(xb), -1, -1)
    assert run("max_sensitivity", model, x[:1], maps[:1], target[:1], fixed, samples=4).item() == 0.0
    scaled = run("avg_sensitivity", model, x, 3 * maps, target, lambda xb, t: 3 * gxi(model)(xb, t),
                 samples=samples, lower_bound=bound)
    torch.testing.assert_close(scaled, avg, rtol=1e-5, atol=0)


def quantus_replay(name, model, x, target, maps, recorded, **params):
    """Quantus's metric on the same inputs: its perturb_func hands back our perturbed inputs, one
    sample (for every image) per call, in order."""
    import quantus

    steps = iter(range(recorded.shape[1]))

    def replay(arr, indices, **kw):
        step = next(steps)
        return recorded[:, step].reshape(arr.shape).numpy()

    def explain(model, inputs, targets, **kw):
        return gxi(model)(torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(targets))).numpy()

    cls = {"max_sensitivity": quantus.MaxSensitivity, "avg_sensitivity": quantus.AvgSensitivity}[name]
    metric = cls(nr_samples=recorded.shape[1], perturb_func=replay, disable_warnings=True, **params)
    out = metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=maps[:, None].numpy(),
                 explain_func=explain, device="cpu")
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("name", ["max_sensitivity", "avg_sensitivity"])
def test_equal_to_quantus_with_the_same_draws(name):
    model = small_cnn()
    x = torch.rand(3, 2, 10, 10, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 1, 3])
    maps = gxi(model)(x, target)
    samples = 10
    rec = Recorder(gxi(model))
    ours = run(name, model, x, maps, target, rec, samples=samples, max_batch=7, seed=5)  # lower_bound 0.2
    recorded = rec.by_image(x, samples)
    ref = quantus_replay(name, model, x, target, maps, recorded)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5)

    # non-default norms, normalisation, abs and the prediction check: Quantus one image at a time
    # (it normalises by the maximum over the whole batch, we per image)
    params = {"norm_numerator": "linf", "normalise": True, "abs": True, "return_nan_when_prediction_changes": True}
    rec = Recorder(gxi(model))
    ours = run(name, model, x, maps, target, rec, samples=samples, lower_bound=0.6, seed=5, **params)
    recorded = rec.by_image(x, samples)
    import quantus

    quantus_params = {**params, "norm_numerator": quantus.norm_func.linf_norm, "lower_bound": 0.6}
    ref = [quantus_replay(name, model, x[i:i + 1], target[i:i + 1], maps[i:i + 1], recorded[i:i + 1],
                          **quantus_params)[0] for i in range(3)]
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-5, equal_nan=True)
    assert np.isnan(ref).any() and not np.isnan(ref).all()  # some images change class: NaN, as Quantus


def test_draws_are_per_image_whatever_the_batch_and_the_chunking():
    model = linear_model()
    x = torch.rand(4, 2, 12, 12, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([1, 0, 4, 2])
    maps = gxi(model)(x, target)
    indices = torch.tensor([10, 11, 12, 13])
    rec = Recorder(gxi(model))
    whole = run("max_sensitivity", model, x, maps, target, rec, samples=9, indices=indices, max_batch=7)
    all_inputs = rec.by_image(x, 9)
    for i in range(4):
        rec = Recorder(gxi(model))
        one = run("max_sensitivity", model, x[i:i + 1], maps[i:i + 1], target[i:i + 1], rec, samples=9,
                  indices=indices[i:i + 1], max_batch=2)
        assert torch.equal(rec.by_image(x[i:i + 1], 9)[0], all_inputs[i])  # bit for bit the same inputs
        torch.testing.assert_close(one, whole[i:i + 1], rtol=1e-6, atol=0)
    # another seed, or another global index, draws other noise
    rec = Recorder(gxi(model))
    run("max_sensitivity", model, x, maps, target, rec, samples=9, indices=indices + 1)
    assert not torch.equal(rec.by_image(x, 9)[0], all_inputs[0])
    rec = Recorder(gxi(model))
    run("max_sensitivity", model, x, maps, target, rec, samples=9, indices=indices, seed=1)
    assert not torch.equal(rec.by_image(x, 9)[0], all_inputs[0])


def test_missing_explain_and_bad_parameters_are_named():
    model = linear_model()
    x = torch.rand(2, 2, 12, 12)
    target = torch.tensor([0, 1])
    maps = gxi(model)(x, target)
    with pytest.raises(ValueError, match=r"'avg_sensitivity' needs the explanation function.*ctx.explain is None"):
        run("avg_sensitivity", model, x, maps, target, None, samples=2)
    with pytest.raises(ValueError, match=r"ctx.explain returned maps of shape \(2, 6, 12\)"):
        run("max_sensitivity", model, x, maps, target, lambda xb, t: maps[:, :6], samples=1)
    with pytest.raises(RegistryError, match="samples must be >= 1"):
        build_metric("max_sensitivity", {"samples": 0})
    with pytest.warns(FutureWarning, match="nr_samples: renamed to 'samples'"):  # Quantus's word, the former one
        assert build_metric("avg_sensitivity", {"nr_samples": 3}).params.samples == 3
    with pytest.raises(RegistryError, match=r"norm_numerator: 'l1' is not one of \['fro', 'linf'\]"):
        build_metric("max_sensitivity", {"norm_numerator": "l1"})
    info = list_metrics()
    for name in ("max_sensitivity", "avg_sensitivity"):
        assert info[name]["higher_is_better"] is False and info[name]["score_output"] == "sensitivity"
        assert info[name]["params"]["samples"] == 200 and info[name]["params"]["lower_bound"] == 0.2
        cls = type(build_metric(name))
        assert cls.needs_explain is True and cls.needs_masks is False and cls.needs_model is True


def test_in_the_job_a_sampling_method_is_robustness_scored_independently_of_its_batch(tmp_path, parquet_dir):
    """The job's ``ctx.explain`` recomputed SmoothGrad on the perturbed inputs with the noise of
    each row's *position* in the batch (indices dropped), so an image's sensitivity changed with
    the batch it landed in. Now each row draws the noise of its own image: two batch sizes give
    the same scores, and so do the MPRT metric's recomputed maps."""
    import zarr

    from distributed_attr.runner import run as run_job
    from tests.conftest import base_config

    stores = []
    for batch in (3, 8):
        cfg = base_config(parquet_dir, tmp_path / f"b{batch}.zarr", batch_size=batch, unit_size=8)
        cfg["data"]["limit"] = 8
        cfg["methods"] = {"smoothgrad": {"samples": 3}}
        cfg["metrics"] = {"avg_sensitivity": {"samples": 2},
                          "model_randomisation": {"steps": 1, "layers": ["classifier"]}}
        run_job(cfg, progress=False)
        stores.append(zarr.open_group(cfg["store"], mode="r"))
    a, b = stores
    np.testing.assert_array_equal(a["maps/smoothgrad"][:], b["maps/smoothgrad"][:])
    for key in ("metrics/avg_sensitivity/sensitivity/smoothgrad",
                "metrics/model_randomisation/final_similarity/smoothgrad"):
        np.testing.assert_allclose(a[key][:], b[key][:], rtol=1e-5, atol=1e-6, err_msg=key)
