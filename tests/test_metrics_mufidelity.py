"""MuFidelity against Quantus 0.6 FaithfulnessCorrelation (fed our subsets), a NumPy/SciPy
reference loop, and the closed form on a linear model."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from distributed_attr import zoo
from distributed_attr.metrics import evaluate
from distributed_attr.metrics.mufidelity import random_subsets, subset_size


@pytest.fixture(scope="module")
def digits():
    model, _ = zoo.pretrained("digits_cnn")
    x, y = zoo.digits_dataset(32)
    return model, torch.from_numpy(x[10:13]), torch.from_numpy(y[10:13])


def test_pixel_level_pearson_matches_quantus_faithfulness_correlation(digits, monkeypatch):
    import quantus
    import quantus.metrics.faithfulness.faithfulness_correlation as fc

    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    n_subsets, fraction = 12, 0.2
    k = subset_size(32 * 32, fraction)
    ours = evaluate(model, x, maps, "mufidelity", y, grid=32, subset_fraction=fraction,
                    n_subsets=n_subsets, correlation="pearson", baseline=0.0, seed=7, max_batch=10)

    # Quantus draws one subset per image per run with np.random.choice: hand it ours, in order.
    removed = random_subsets(torch.arange(3), 7, n_subsets, 32 * 32, k).numpy()
    draws = iter([np.flatnonzero(removed[i, run]) for run in range(n_subsets) for i in range(3)])

    class FakeRandom:
        def choice(self, n, size, replace=False):
            assert (n, size, replace) == (32 * 32, k, False)
            return next(draws)

    monkeypatch.setattr(fc.np, "random", FakeRandom())
    metric = quantus.FaithfulnessCorrelation(nr_runs=n_subsets, subset_size=k, perturb_baseline=0.0,
                                             normalise=False, return_aggregate=False, disable_warnings=True)
    ref = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy()[:, None],
                 device="cpu", softmax=True)
    monkeypatch.undo()
    np.testing.assert_allclose(ours["correlation"].numpy(), np.asarray(ref), atol=1e-4)


def test_grid_spearman_matches_a_reference_loop(digits):
    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    grid, n_subsets = 9, 16
    ours = evaluate(model, x, maps, "mufidelity", y, grid=grid, n_subsets=n_subsets, seed=3,
                    indices=torch.tensor([100, 5, 42]))
    removed = random_subsets(torch.tensor([100, 5, 42]), 3, n_subsets, grid * grid,
                             subset_size(grid * grid, 0.2)).numpy()
    assert removed.sum(-1).tolist() == [[16] * n_subsets] * 3  # exactly 20% of 81 cells, rounded
    expected = []
    for i in range(3):
        with torch.no_grad():
            p0 = torch.softmax(model(x[i : i + 1]), 1)[0, y[i]].item()
        drops, masses = [], []
        for s in range(n_subsets):
            cells = torch.from_numpy(removed[i, s].reshape(1, 1, grid, grid).astype(np.float32))
            pix = F.interpolate(cells, size=(32, 32), mode="nearest")[0, 0].numpy() > 0.5
            img = x[i].clone()
            img[:, torch.from_numpy(pix)] = 0.0
            with torch.no_grad():
                p = torch.softmax(model(img[None]), 1)[0, y[i]].item()
            drops.append(p0 - p)
            masses.append(maps[i].double().numpy()[pix].sum())
        expected.append(scipy.stats.spearmanr(masses, drops).statistic)
    np.testing.assert_allclose(ours["correlation"].numpy(), expected, atol=1e-4)


def test_subsets_depend_on_the_image_index_not_the_batch(digits):
    model, x, y = digits
    maps = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    together = evaluate(model, x, maps, "mufidelity", y, n_subsets=8, indices=torch.tensor([4, 9, 1]))
    alone = evaluate(model, x[2:], maps[2:], "mufidelity", y[2:], n_subsets=8, indices=torch.tensor([1]))
    assert together["correlation"][2].item() == pytest.approx(alone["correlation"][0].item(), abs=1e-6)
    other_seed = evaluate(model, x, maps, "mufidelity", y, n_subsets=8, indices=torch.tensor([4, 9, 1]), seed=1)
    assert not torch.equal(together["correlation"], other_seed["correlation"])


def test_linear_model_perfect_map_correlates_one_reversed_minus_one_random_near_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 4)).eval()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 3])
    w = model[1].weight.detach().view(4, 12, 12)
    perfect = w[target] * x[:, 0]
    kw = dict(grid=6, n_subsets=64, output="logit")
    # logit drop when cells go to 0 is exactly their summed contribution: correlation 1
    for corr in ("spearman", "pearson"):
        good = evaluate(model, x, perfect, "mufidelity", target, correlation=corr, **kw)["correlation"]
        bad = evaluate(model, x, -perfect, "mufidelity", target, correlation=corr, **kw)["correlation"]
        np.testing.assert_allclose(good.numpy(), 1.0, atol=1e-5)
        np.testing.assert_allclose(bad.numpy(), -1.0, atol=1e-5)
    rnd = torch.stack([
        evaluate(model, x, torch.randn(4, 12, 12, generator=torch.Generator().manual_seed(s)),
                 "mufidelity", target, **kw)["correlation"] for s in range(4)
    ])
    assert rnd.abs().mean() < 0.3
    # softmax output: still the perfect map on top
    good_p = evaluate(model, x, perfect, "mufidelity", target, grid=6, n_subsets=64)["correlation"]
    rnd_p = evaluate(model, x, torch.randn(4, 12, 12), "mufidelity", target, grid=6, n_subsets=64)["correlation"]
    assert (good_p > rnd_p).all()


def test_constant_output_counts_as_zero():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
    x = torch.rand(2, 1, 8, 8)
    out = evaluate(model, x, torch.randn(2, 8, 8), "mufidelity", [0, 1], grid=4, n_subsets=8)
    assert out["correlation"].tolist() == [0.0, 0.0]
