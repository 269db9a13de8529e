"""The cascading randomisation check against Quantus 0.6's MPRT fed the same explanation function,
and the ``model_randomisation`` metric (the check from a job config, through ``ctx.explain``):
equal to the check at its cascade points, the model restored bit for bit, batch independent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_attr import zoo
from distributed_attr.methods import attribute
from distributed_attr.metrics import build_metric, evaluate, list_metrics, randomisation_check
from distributed_attr.metrics.base import MetricContext
from distributed_attr.metrics.randomisation import cascade_points, randomisable_layers
from distributed_attr.registry import RegistryError

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def digits():
    model, _ = zoo.pretrained("digits_cnn")
    x, y = zoo.digits_dataset(32)
    return model, torch.from_numpy(x[:3]), torch.from_numpy(y[:3])


def test_matches_quantus_mprt(digits):
    import quantus

    model, x, y = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = randomisation_check(model, x, "gradient_x_input", y, seed=41)

    def explain(model, inputs, targets, **kwargs):
        maps = attribute(model, torch.as_tensor(inputs), "gradient_x_input", torch.as_tensor(targets))
        return maps[:, None].numpy()

    metric = quantus.MPRT(seed=41, disable_warnings=True)
    ref = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                 explain_func=explain, device="cpu")
    ref.pop("original")
    assert list(ours) == list(ref) == randomisable_layers(model)[::-1]
    for layer in ours:
        np.testing.assert_allclose(ours[layer].numpy(), ref[layer], atol=1e-5, err_msg=layer)
    # the model itself is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_layers_off_the_path_do_not_change_the_map():
    torch.manual_seed(0)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))

        def forward(self, x):
            return self.body(x)

    model = WithUnused().eval()
    x = torch.rand(2, 1, 8, 8)
    out = randomisation_check(model, x, "saliency", [0, 1], layers_order=["unused", "body.3"])
    assert list(out) == ["unused", "body.3"]
    np.testing.assert_allclose(out["unused"].numpy(), 1.0, atol=1e-6)
    assert (out["body.3"] < 0.99).all()
    with pytest.raises(ValueError, match="randomisable layers"):
        randomisation_check(model, x, "saliency", [0, 1], layers_order=["nope"])


# --------------------------------------------------------------------------------------------
# The ``model_randomisation`` metric (the check from a job config, through ctx.explain)
# --------------------------------------------------------------------------------------------

def explainer(model, method="gradient_x_input"):
    return lambda xb, tb: attribute(model, xb, method, tb)


def run_metric(model, x, maps, target, explain, *, seed=0, indices=None, max_batch=256, **params):
    metric = build_metric("model_randomisation", params)
    ctx = MetricContext(seed=seed, indices=indices, budget=max_batch, explain=explain)
    return metric.evaluate(model, x, maps, target, ctx)


def snapshot(model):
    """Everything ``evaluate`` must leave as it found it: values, tensor objects, storages, RNG."""
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            {k: (id(v), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()},
            torch.get_rng_state())


def assert_unchanged(model, before):
    values, ids, rng = before
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(values)
    for k, v in now.items():
        assert torch.equal(v.detach(), values[k]) and v.dtype == values[k].dtype, k
        assert (id(v), v.data_ptr()) == ids[k], k
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("layers,steps,similarity,absolute", [
    ("top_down", 4, "spearman", True),
    ("top_down", 9, "pearson", False),   # every layer of the cascade
    ("top_down", 12, "spearman", True),  # more points than layers: points repeat
    ("bottom_up", 3, "spearman", True),
    (["classifier", "features.9", "features.0"], 2, "spearman", True),
])
def test_metric_equals_randomisation_check_at_its_cascade_points(digits, layers, steps, similarity, absolute):
    model, x, y = digits
    ref = randomisation_check(model, x, "gradient_x_input", y, layers, seed=7, similarity=similarity,
                              absolute=absolute)
    names = list(ref)
    points = cascade_points(len(names), steps)
    assert len(points) == steps and points[-1] == len(names)
    expected = torch.stack([ref[names[c - 1]] for c in points], 1)
    maps = attribute(model, x, "gradient_x_input", y)
    before = snapshot(model)
    out = run_metric(model, x, maps, y, explainer(model), seed=7, layers=layers, steps=steps,
                     similarity=similarity, abs=absolute)
    assert_unchanged(model, before)
    assert out["similarity"].shape == (3, steps) and out["final_similarity"].shape == (3,)
    torch.testing.assert_close(out["similarity"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["final_similarity"], expected[:, -1], rtol=0, atol=1e-6)
    if steps == len(names):
        torch.testing.assert_close(out["similarity"], torch.stack(list(ref.values()), 1), rtol=0, atol=1e-6)
    # the one-call form gives the same numbers
    again = evaluate(model, x, maps, "model_randomisation", y, seed=7, explain=explainer(model), layers=layers,
                     steps=steps, similarity=similarity, abs=absolute)
    torch.testing.assert_close(again["similarity"], out["similarity"], rtol=0, atol=0)


def test_the_seed_is_the_jobs_unless_reinit_seed_is_set(digits):
    model, x, y = digits
    maps = attribute(model, x, "gradient_x_input", y)
    ref = randomisation_check(model, x, "gradient_x_input", y, seed=7)
    names = list(ref)
    expected = torch.stack([ref[names[c - 1]] for c in cascade_points(len(names), 4)], 1)
    from_ctx = evaluate(model, x, maps, "model_randomisation", y, seed=7, explain=explainer(model))
    torch.testing.assert_close(from_ctx["similarity"], expected, rtol=0, atol=1e-6)
    metric = build_metric("model_randomisation", {"reinit_seed": 7})
    own = metric.evaluate(model, x, maps, y, MetricContext(seed=0, explain=explainer(model)))
    torch.testing.assert_close(own["similarity"], expected, rtol=0, atol=1e-6)
    other = evaluate(model, x, maps, "model_randomisation", y, seed=8, explain=explainer(model))
    assert not torch.equal(other["similarity"], from_ctx["similarity"])


class Replacing(nn.Module):
    """A layer whose reset_parameters swaps in new Parameter objects (allowed by PyTorch, done by
    some third-party layers), and another that reassigns ``.data``: the metric must put the
    original tensors back, not only their values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(3))
        self.head = nn.Linear(3 * 8 * 8, 4)

    def reset_parameters(self):
        self.scale = nn.Parameter(torch.rand(3))
        self.head.weight.data = torch.randn_like(self.head.weight)

    def forward(self, x):
        return self.head((self.conv(x) * self.scale.view(1, -1, 1, 1)).flatten(1))


class Failing:
    """An explanation function that raises on its ``fail_on``-th call, after checking that the
    model it explains has indeed been re-initialised."""

    def __init__(self, model, original, fail_on):
        self.model, self.original, self.fail_on, self.calls, self.changed = model, original, fail_on, 0, []

    def __call__(self, xb, tb):
        self.calls += 1
        now = self.model.state_dict()
        self.changed.append(any(not torch.equal(now[k], v) for k, v in self.original.items()))
        if self.calls == self.fail_on:
            raise RuntimeError("the method broke")
        return attribute(self.model, xb, "saliency", tb)


def test_the_model_is_restored_bit_for_bit_also_when_the_method_raises(digits):
    model, x, y = digits
    maps = attribute(model, x, "saliency", y)
    model.features[0].weight.grad = torch.full_like(model.features[0].weight, 0.5)  # a gradient survives too
    grad = model.features[0].weight.grad
    try:
        before = snapshot(model)
        training = [m.training for m in model.modules()]
        rec = Failing(model, before[0], fail_on=0)
        run_metric(model, x, maps, y, rec, steps=3)
        assert rec.changed == [True, True, True]  # explain saw re-initialised models
        assert_unchanged(model, before)
        assert model.features[0].weight.grad is grad and (grad == 0.5).all()
        assert [m.training for m in model.modules()] == training
        for fail_on in (1, 3):
            rec = Failing(model, before[0], fail_on=fail_on)
            with pytest.raises(RuntimeError, match="the method broke"):
                run_metric(model, x, maps, y, rec, steps=3)
            assert rec.calls == fail_on and rec.changed[-1]
            assert_unchanged(model, before)
        # a bad shape from explain, a KeyboardInterrupt: restored as well
        with pytest.raises(ValueError, match=r"ctx.explain returned maps of shape \(3, 4, 32\)"):
            run_metric(model, x, maps, y, lambda xb, tb: torch.zeros(len(xb), 4, 32), steps=2)
        assert_unchanged(model, before)

        def interrupt(xb, tb):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_metric(model, x, maps, y, interrupt, steps=2)
        assert_unchanged(model, before)
    finally:
        model.features[0].weight.grad = None

    # reset_parameters that replace Parameter objects or their storage
    torch.manual_seed(0)
    custom = nn.Sequential(Replacing()).eval()
    xs = torch.rand(2, 1, 8, 8)
    target = torch.tensor([0, 3])
    smaps = attribute(custom, xs, "saliency", target)
    before = snapshot(custom)
    params = list(custom.parameters())
    out = run_metric(custom, xs, smaps, target, explainer(custom, "saliency"), layers=["0"], steps=1)
    assert (out["final_similarity"] < 0.999).all()  # the replaced parameters were used by explain
    assert_unchanged(custom, before)
    assert all(a is b for a, b in zip(custom.parameters(), params))
    with pytest.raises(RuntimeError, match="the method broke"):
        run_metric(custom, xs, smaps, target, Failing(custom, before[0], 1), layers=["0", "0.conv"], steps=2)
    assert_unchanged(custom, before)
    assert all(a is b for a, b in zip(custom.parameters(), params))


def test_scores_do_not_depend_on_the_batch(digits):
    model, _, _ = digits
    xs, ys = zoo.digits_dataset(32)
    x, y = torch.from_numpy(xs[3:9]), torch.from_numpy(ys[3:9])
    maps = attribute(model, x, "saliency", y)
    explain = explainer(model, "saliency")
    indices = torch.arange(100, 106)
    whole = run_metric(model, x, maps, y, explain, indices=indices, steps=3)["similarity"]
    again = run_metric(model, x, maps, y, explain, indices=indices, steps=3)["similarity"]
    assert torch.equal(whole, again)  # deterministic
    assert not torch.isnan(whole).any()
    for i in range(6):  # each image alone, and chunked 4 at a time in reverse order
        one = run_metric(model, x[i:i + 1], maps[i:i + 1], y[i:i + 1], explain, indices=indices[i:i + 1], steps=3)
        torch.testing.assert_close(one["similarity"], whole[i:i + 1], rtol=0, atol=1e-6)
    rev = torch.arange(5, -1, -1)
    flipped = run_metric(model, x[rev], maps[rev], y[rev], explain, indices=indices[rev], max_batch=4, steps=3)
    torch.testing.assert_close(flipped["similarity"], whole[rev], rtol=0, atol=1e-6)


def test_missing_explain_and_bad_parameters_are_named(digits):
    model, x, y = digits
    maps = attribute(model, x, "saliency", y)
    with pytest.raises(ValueError, match=r"'model_randomisation' needs the explanation function.*ctx.explain is None"):
        run_metric(model, x, maps, y, None)
    with pytest.raises(ValueError, match=r"'model_randomisation' needs the explanation function"):
        evaluate(model, x, maps, "model_randomisation", y)
    with pytest.raises(ValueError, match=r"'model_randomisation': layers \['nope'\] cannot be re-initialised; "
                                         r"randomisable layers: \['features.0'"):
        run_metric(model, x, maps, y, explainer(model, "saliency"), layers=["classifier", "nope"])
    with pytest.raises(ValueError, match="no module with a reset_parameters"):
        run_metric(nn.Sequential(nn.Flatten(), nn.Softmax(1)), x, maps, y, explainer(model, "saliency"))
    for params, message in [
        ({"steps": 0}, "steps must be >= 1"),
        ({"similarity": "kendall"}, r"similarity 'kendall' is not one of \['spearman', 'pearson'\]"),
        ({"layers": "sideways"}, r"layers 'sideways' is not one of \['top_down', 'bottom_up'\]"),
        ({"layers": ["classifier", "classifier"]}, "name a module twice"),
        ({"layers": []}, "at least one module"),
        ({"seed": 3}, r"unknown parameter\(s\) \['seed'\]"),
        ({"reinit_seed": "x"}, "reinit_seed: expected an integer"),
        ({"layers": 3}, "layers: expected a string"),
    ]:
        with pytest.raises(RegistryError, match=message):
            build_metric("model_randomisation", params)
    info = list_metrics()["model_randomisation"]
    assert info["higher_is_better"] is False and info["score_output"] == "final_similarity"
    assert info["params"] == {"layers": "top_down", "steps": 4, "similarity": "spearman", "abs": True,
                              "reinit_seed": None}
    assert info["needs_explain"] is True and info["needs_model"] is True and info["needs_masks"] is False
    metric = build_metric("model_randomisation", {"steps": 3, "layers": ["classifier"]})
    assert metric.params.layers == ("classifier",)
    ctx = MetricContext()
    assert metric.outputs(ctx) == {"similarity": (("step",), (3,)), "final_similarity": ((), ())}
    assert metric.coords(ctx) == {"step": [1 / 3, 2 / 3, 1.0]} and metric.cost() == 3.0


def test_the_metric_runs_from_a_job_config(tmp_path, parquet_dir, make_config, zoo_cnn):
    """``metrics: {model_randomisation: {...}}`` in a job: stored per image, method and cutoff,
    equal to the metric evaluated from Python on what the store holds (raw maps)."""
    import zarr

    from distributed_attr.config import Config
    from distributed_attr.io.sources import decode_image, open_source
    from distributed_attr.io.store import Keys
    from distributed_attr.runner import run

    cfg = make_config(parquet_dir, tmp_path / "s.zarr", map_dtype="float32", unit_size=32, batch_size=16)
    cfg["methods"] = {"saliency": {}}
    cfg["filters"] = {"sweep": [100]}
    cfg["metrics"] = {"model_randomisation": {"steps": 2, "layers": "top_down"}}
    summary = run(cfg, progress=False)
    assert summary.units_done == summary.units and not summary.failures
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    sim = g[Keys.metric("model_randomisation", "similarity", "saliency")]
    final = g[Keys.metric("model_randomisation", "final_similarity", "saliency")][:]
    assert sim.shape == (96, 2, 2) and final.shape == (96, 2)
    assert sim.attrs["coords"] == {"step": [0.5, 1.0]}
    sim = sim[:]
    np.testing.assert_array_equal(final, sim[:, :, -1])
    assert np.isfinite(sim).all() and (sim < 1).all()
    model = zoo_cnn[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = open_source(Config.from_dict(cfg).data)
    x = torch.stack([decode_image(r.payload, Config.from_dict(cfg).data) for r in src.read(0, len(src))])
    maps = torch.from_numpy(g["maps/saliency"][:])
    target = torch.from_numpy(g["target"][:])
    # every batch after the first was explained by the restored model: the stored maps are the
    # trained model's
    torch.testing.assert_close(maps, attribute(model, x, "saliency", target), rtol=1e-5, atol=1e-7)
    expected = evaluate(model, x, maps, "model_randomisation", target, steps=2,
                        explain=explainer(model, "saliency"))["similarity"]
    np.testing.assert_allclose(sim[:, 0], expected.numpy(), atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_compiled_model_sees_the_randomisation(parquet_dir, make_config, monkeypatch, tmp_path):
    """With run.compile the pipeline's explain runs the torch.compile wrapper, which shares the
    model's parameters: it must see them re-initialised in place, and the trained ones after.
    (``aot_eager``, as tests/test_fast_paths.py, for speed.)"""
    from distributed_attr.config import Config
    from distributed_attr.pipeline import UnitProcessor

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="aot_eager", **kw))
    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    cfg["methods"] = {"saliency": {}}
    cfg["metrics"] = {"model_randomisation": {"steps": 2}}
    xs, ys = zoo.digits_dataset(32)
    x, y = torch.from_numpy(xs[:6]), torch.from_numpy(ys[:6])
    out = {}
    for compile_ in (False, True):
        cfg["run"]["compile"] = compile_
        proc = UnitProcessor(Config.from_dict(cfg), device="cpu")
        assert (proc.compiled is not None) == compile_ and proc.compile_error is None
        first = proc.compute_batch(x, y, torch.arange(6))
        second = proc.compute_batch(x, y, torch.arange(6))
        for key in first:
            np.testing.assert_array_equal(second[key], first[key], err_msg=key)
        out[compile_] = first
    from distributed_attr.io.store import Keys

    key = Keys.metric("model_randomisation", "similarity", "saliency")
    assert (out[False][key] < 0.9).all()
    np.testing.assert_allclose(out[True][key], out[False][key], atol=1e-5)
    np.testing.assert_allclose(out[True]["maps/saliency"], out[False]["maps/saliency"], rtol=1e-5, atol=1e-7)
