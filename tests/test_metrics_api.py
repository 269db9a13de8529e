"""The contract every registered metric follows, with its cases taken from the registry: a new
metric is tested here as soon as it registers, without being added to any list.

Each metric is evaluated on a small CNN's saliency maps, with what it declares it needs (masks,
an explain callable, an evaluator model): its outputs must be the declared ones, of the declared
shapes, finite, and the same for an image whatever other images share its batch."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import distributed_attr
from distributed_attr.methods import build_method, compute_maps
from distributed_attr.methods.base import Context
from distributed_attr.metrics import METRICS, build_metric
from distributed_attr.metrics.base import MetricContext

NAMES = list(METRICS)
#: parameters that keep a metric's cost small here; a metric not listed runs with its defaults
FAST = {
    "avg_sensitivity": {"samples": 3},
    "max_sensitivity": {"samples": 3},
    "deletion": {"steps": 4},
    "insertion": {"steps": 4},
    "forgrad_protocol": {"steps": 4},
    "mufidelity": {"grid": 4, "n_subsets": 16},
    "model_randomisation": {"steps": 2},
    "top_k_intersection": {"k": 40},
    "feature_detection": {"keep": (0.25, 0.5)},
}
#: the most model passes per image a metric may cost with its fast parameters
MAX_COST = 100


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)).eval()


@pytest.fixture(scope="module")
def setup():
    model = small_cnn(0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        target = model(x).argmax(1)
    saliency = build_method("saliency", {})

    def explain(xs, ts, indices=None):
        return compute_maps(model, xs, ts, [saliency], Context(indices=indices))["saliency"]

    maps = explain(x, target, torch.arange(4))
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    for i in range(4):  # a different square per image
        masks[i, 2 * i:2 * i + 8, 8 - i:16 - i] = True
    return model, x, target, maps, masks, explain, {"other": small_cnn(1)}


def context(setup, rows: slice) -> MetricContext:
    model, x, target, maps, masks, explain, evaluators = setup
    return MetricContext(seed=5, indices=torch.arange(4)[rows], budget=64, evaluators=evaluators,
                         dataset_mean=x.mean(dim=(0, 2, 3)), masks=masks[rows], explain=explain)


def evaluate(name: str, setup, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    model, x, target, maps, *_ = setup
    metric = build_metric(name, FAST.get(name, {}))
    return metric.evaluate(model, x[rows], maps[rows], target[rows], context(setup, rows))


@pytest.mark.parametrize("name", NAMES)
def test_every_metric_is_registered_and_described(name):
    info = distributed_attr.list_metrics()[name]
    assert isinstance(info["higher_is_better"], bool) and info["doc"], info
    assert isinstance(info["params"], dict)
    metric = build_metric(name, FAST.get(name, {}))
    # a metric that reads the map alone costs no model pass; every other one costs some
    assert (metric.cost() > 0) == metric.needs_model, (name, metric.cost())
    assert metric.cost() <= MAX_COST, f"{name}: {metric.cost()} passes per image with {FAST.get(name, {})}"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_the_declared_ones_with_the_declared_shapes(name, setup):
    metric = build_metric(name, FAST.get(name, {}))
    ctx = context(setup, slice(None))
    declared = metric.outputs(ctx)
    assert metric.score_output in declared and declared[metric.score_output] == ((), ()), declared
    out = evaluate(name, setup)
    assert set(out) == set(declared)
    coords = metric.coords(ctx)
    for key, (dims, sizes) in declared.items():
        assert len(dims) == len(sizes)
        assert tuple(out[key].shape) == (4, *sizes), (key, out[key].shape)
        assert out[key].dtype.is_floating_point or out[key].dtype == torch.bool, (key, out[key].dtype)
        assert torch.isfinite(out[key].float()).all(), (key, out[key])
        for dim, size in zip(dims, sizes):
            if dim in coords:
                assert len(coords[dim]) == size, (dim, coords[dim])


@pytest.mark.parametrize("name", NAMES)
def test_an_image_scores_the_same_in_any_batch(name, setup):
    """Images 2 and 3 evaluated alone (with their own indices and masks) score as inside the
    batch 0..3: random draws follow the image, not its position in the batch."""
    whole = evaluate(name, setup)
    part = evaluate(name, setup, slice(2, 4))
    for key in whole:
        torch.testing.assert_close(part[key].float(), whole[key][2:4].float(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}.{key}: {m}")


@pytest.mark.parametrize("name", [n for n in NAMES if METRICS.get(n).needs_masks or METRICS.get(n).needs_explain])
def test_a_missing_need_is_named(name, setup):
    model, x, target, maps, *_ = setup
    cls = METRICS.get(name)
    ctx = context(setup, slice(None))
    ctx = dataclasses.replace(ctx, masks=None) if cls.needs_masks else dataclasses.replace(ctx, explain=None)
    with pytest.raises(ValueError, match=name):
        cls(**FAST.get(name, {})).evaluate(model, x, maps, target, ctx)


@pytest.mark.parametrize("name", [n for n in NAMES if not METRICS.get(n).needs_model])
def test_a_metric_that_needs_no_model_runs_without_one(name, setup):
    _, x, target, maps, *_ = setup
    out = build_metric(name, FAST.get(name, {})).evaluate(None, x, maps, target, context(setup, slice(None)))
    torch.testing.assert_close(out[METRICS.get(name).score_output], evaluate(name, setup)[METRICS.get(name).score_output])
