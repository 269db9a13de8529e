"""Merged per-shard moments equal one float64 NumPy pass, whatever the split and merge order."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed_attr.aggregate.stats import Z95, GroupedMoments, Moments


def _numpy_reference(x):
    n = x.shape[0]
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=1)
    return mean, std, 1.96 * std / np.sqrt(n)


def _split(x, keys, cuts, order):
    """Shards of (x, keys) at the sorted cut points, returned in ``order``."""
    bounds = [0, *sorted(cuts), len(x)]
    shards = [(x[a:b], keys[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [shards[i] for i in order(len(shards))]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 60),
    shape=st.sampled_from([(), (3,), (2, 4)]),
    seed=st.integers(0, 2**32 - 1),
    offset=st.sampled_from([0.0, 1e4]),  # a large mean tests the cancellation-free merge
    n_cuts=st.integers(0, 8),
)
def test_merged_shards_equal_one_numpy_pass(n, shape, seed, offset, n_cuts):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, *shape)) * rng.uniform(0.1, 10) + offset).astype(np.float32)
    keys = rng.integers(0, 3, size=n)
    cuts = rng.integers(0, n + 1, size=n_cuts)
    shards = _split(x, keys, cuts, lambda k: rng.permutation(k))

    # per-shard states (some shards are empty), merged in a random order as a tree or a chain
    states = []
    for xs, ks in shards:
        states.append((Moments().update(xs), GroupedMoments().update(xs, ks)))
    if rng.random() < 0.5:
        total = Moments.combine(s for s, _ in states)
        grouped = GroupedMoments()
        for _, g in states:
            grouped.merge(g)
    else:  # pairwise tree reduction
        level = states
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level) - 1, 2):
                nxt.append((level[i][0].copy().merge(level[i + 1][0]), GroupedMoments().merge(level[i][1]).merge(level[i + 1][1])))
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        total, grouped = level[0]

    x64 = x.astype(np.float64)
    mean, std, ci = _numpy_reference(x64)
    res = total.compute()
    assert np.all(res.count == n)
    np.testing.assert_allclose(res.mean, mean, rtol=1e-6, atol=1e-9 * (1 + offset))
    np.testing.assert_allclose(res.std, std, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.ci95, ci, rtol=1e-6, atol=1e-12)

    per_class = grouped.compute()
    assert sorted(per_class) == sorted(set(keys.tolist()))
    for k, r in per_class.items():
        xk = x64[keys == k]
        np.testing.assert_allclose(r.mean, xk.mean(axis=0), rtol=1e-6, atol=1e-9 * (1 + offset))
        assert np.all(r.count == len(xk))
        if len(xk) > 1:
            np.testing.assert_allclose(r.std, xk.std(axis=0, ddof=1), rtol=1e-6, atol=1e-12)
        else:
            assert np.all(np.isnan(r.std))
    # the groups merged back together are the whole
    np.testing.assert_allclose(grouped.total().compute().std, std, rtol=1e-6, atol=1e-12)


def test_skip_nan_counts_per_element_and_torch_input():
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, np.nan], [3.0, 4.0], [5.0, 8.0]])
    a = Moments().update(x[:1], skip_nan=True).merge(Moments().update(torch.from_numpy(x[1:]), skip_nan=True))
    r = a.compute()
    np.testing.assert_array_equal(r.count, [3, 2])
    np.testing.assert_allclose(r.mean, [3.0, 6.0])
    np.testing.assert_allclose(r.std, [2.0, np.sqrt(8.0)])
    np.testing.assert_allclose(r.ci95, [Z95 * 2 / np.sqrt(3), Z95 * np.sqrt(8.0) / np.sqrt(2)])
    assert np.isnan(Moments().update(x).compute().mean[1])  # without skip_nan NaN propagates


def test_errors_say_what_is_wrong():
    m = Moments().update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(4,\).*\(3,\)"):
        m.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no samples"):
        Moments().compute()
    with pytest.raises(ValueError, match="one key per sample"):
        GroupedMoments().update(np.zeros((3, 2)), [0, 1])


def test_block_wise_reduction_equals_one_block(monkeypatch):
    """Moments.update reduces big batches in cache-sized row blocks merged with the same update;
    with 3-row blocks (NaNs included) it must still equal NumPy."""
    from distributed_attr.aggregate import stats

    rng = np.random.default_rng(7)
    x = rng.normal(size=(20, 4, 5)) * 3 + 50
    x[[2, 9, 15], 1, 2] = np.nan
    monkeypatch.setattr(stats, "BLOCK_BYTES", 3 * 4 * 5 * 8)
    r = Moments().update(x.astype(np.float16), skip_nan=True).compute()
    x16 = x.astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(r.mean, np.nanmean(x16, axis=0), rtol=1e-12)
    np.testing.assert_allclose(r.std, np.nanstd(x16, axis=0, ddof=1), rtol=1e-10)
    assert r.count[1, 2] == 17 and r.count[0, 0] == 20


@pytest.mark.parametrize("with_nan", [False, True])
def test_grouped_small_and_wide_paths_equal_numpy(monkeypatch, with_nan):
    """GroupedMoments reduces narrow samples for all groups at once (indicator-matrix products)
    and wide ones group by group; a batch with NaN always goes group by group. Both paths, with
    a large offset (cancellation) and int keys in any order, equal NumPy per group."""
    from distributed_attr.aggregate import stats

    rng = np.random.default_rng(11)
    x = rng.normal(size=(57, 3, 7)) * 2 + 1e4
    if with_nan:
        x[[1, 30], 2, 5] = np.nan
    keys = rng.choice([7, -2, 40], size=57)
    results = {}
    for path, limit in (("small", 10_000), ("wide", 0)):
        monkeypatch.setattr(stats, "SMALL_SAMPLE", limit)
        g = GroupedMoments()
        for a, b in ((0, 20), (20, 21), (21, 57)):  # shards of uneven size, one of a single row
            g.update(x[a:b], keys[a:b], skip_nan=True)
        results[path] = g.compute()
    for path, res in results.items():
        assert sorted(res) == [-2, 7, 40], path
        for k, r in res.items():
            xk = x[keys == k]
            np.testing.assert_allclose(r.mean, np.nanmean(xk, axis=0), rtol=1e-12, err_msg=path)
            np.testing.assert_allclose(r.std, np.nanstd(xk, axis=0, ddof=1), rtol=1e-9, err_msg=path)
            np.testing.assert_array_equal(r.count, (~np.isnan(xk)).sum(axis=0))


def test_an_infinite_value_stays_in_its_own_group():
    """float16 maps can overflow to inf: it must make its own group's moments inf/NaN and leave
    the other groups alone (an indicator-matrix product would spread 0 x inf = NaN)."""
    x = np.array([[1.0, 5.0], [2.0, 6.0], [np.inf, 7.0], [4.0, 8.0]])
    with np.errstate(invalid="ignore"):  # inf - inf in the group that holds the inf
        res = GroupedMoments().update(x, [0, 0, 1, 1]).compute()
    np.testing.assert_allclose(res[0].mean, [1.5, 5.5])
    np.testing.assert_allclose(res[1].mean[1], 7.5)
    assert not np.isfinite(res[1].mean[0])


@pytest.mark.parametrize("width", [11, 100])
def test_many_groups_equal_numpy(width):
    """More groups than the indicator-matrix path takes: the sorted-sums path (and, for wide
    rows with many rows per group, group by group) equals NumPy for every group."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, width)) + 1e3
    keys = rng.integers(0, 300, size=600)
    g = GroupedMoments().update(x[:250], keys[:250]).update(x[250:], keys[250:])
    res = g.compute()
    assert sorted(res) == sorted(set(keys.tolist()))
    for k, r in res.items():
        xk = x[keys == k]
        np.testing.assert_allclose(r.mean, xk.mean(axis=0), rtol=1e-12)
        assert np.all(r.count == len(xk))
        if len(xk) > 1:
            np.testing.assert_allclose(r.std, xk.std(axis=0, ddof=1), rtol=1e-8)
