"""Cutoff statistics, rankings and the cross-architecture matrix on synthetic stores whose answer
is known, written with zarr directly in the store schema 1.0 layout."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from distributed_attr.evaluation import (
    bootstrap_means,
    cross_architecture_matrix,
    cutoff_statistics,
    load_metric,
    rank_methods,
    run_evaluation,
    validation_mask,
)
from distributed_attr.evaluation import stats as eval_stats

CUTOFFS = [math.inf, 2.0, 4.0, 8.0, 16.0]


def write_store(path: Path, metrics: dict, *, n: int, unit_size: int = 10, methods=("a", "b"),
                ok=None, done=None, model="digits_cnn", coords=None, dims=None) -> Path:
    """``metrics``: {metric: {output: {method: array (n, K, *trailing)}}}."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    n_units = -(-n // unit_size)
    root.attrs.update(schema_version="1.0", unit_size=unit_size, n_images=n, n_units=n_units,
                      methods=list(methods), metrics=list(metrics), ready=True,
                      config={"model": {"name": model}})
    root.create_array("image", data=np.arange(n, dtype=np.int64), dimension_names=["image"])
    for name in ("label", "target", "prediction"):
        root.create_array(name, data=np.zeros(n, dtype=np.int64), dimension_names=["image"])
    root.create_array("probability", data=np.ones(n, dtype=np.float32), dimension_names=["image"])
    root.create_array("ok", data=np.ones(n, bool) if ok is None else np.asarray(ok), dimension_names=["image"])
    root.create_array("units/done", data=np.ones(n_units, np.uint8) if done is None else np.asarray(done, np.uint8),
                      dimension_names=["unit"])
    root.create_array("units/seconds", data=np.ones(n_units, np.float32), dimension_names=["unit"])
    for method in methods:  # every store has its methods' maps (opening checks them)
        root.create_array(f"maps/{method}", data=np.zeros((n, 2, 2), np.float16), dimension_names=["image", "y", "x"])
    root.create_array("metrics/cutoff", data=np.asarray(CUTOFFS), dimension_names=["cutoff"])
    for metric, outputs in metrics.items():
        for output, per_method in outputs.items():
            for method, values in per_method.items():
                values = np.asarray(values, dtype=np.float32)
                trailing = (dims or {}).get(output, tuple(f"d{i}" for i in range(values.ndim - 2)))
                root.create_array(f"metrics/{metric}/{output}/{method}", data=values,
                                  dimension_names=["image", "cutoff", *trailing],
                                  attributes={"coords": (coords or {}).get(output, {})})
    return path


def peaked(n, peak_index, height, rng, base=0.5, noise=0.05):
    """(n, K) scores: ``base`` everywhere plus ``height`` at ``peak_index``, plus noise."""
    v = base + noise * rng.standard_normal((n, len(CUTOFFS)))
    if peak_index is not None:
        v[:, peak_index] += height
    return v


def test_validation_split_is_stable_as_the_dataset_grows():
    small = validation_mask(np.arange(1000), 0.25, seed=3)
    large = validation_mask(np.arange(5000), 0.25, seed=3)
    np.testing.assert_array_equal(small, large[:1000])
    assert abs(large.mean() - 0.25) < 0.03
    # order does not matter, the seed does
    perm = np.random.default_rng(0).permutation(5000)
    np.testing.assert_array_equal(validation_mask(perm, 0.25, seed=3), large[perm])
    assert (validation_mask(np.arange(5000), 0.25, seed=4) != large).mean() > 0.2


def test_best_cutoff_found_and_gain_reported_with_paired_bootstrap(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    # insertion (higher is better): "a" peaks at cutoff 8 (+0.2), "b" is best unfiltered.
    ins = {"a": peaked(n, 3, 0.2, rng), "b": peaked(n, 0, 0.1, rng)}
    # deletion (lower is better): "a" is best at cutoff 4 (-0.15)
    dele = {"a": peaked(n, 2, -0.15, rng), "b": peaked(n, None, 0.0, rng)}
    store = write_store(tmp_path / "s.zarr", {"insertion": {"auc": ins}, "deletion": {"auc": dele}}, n=n)

    s = cutoff_statistics(store, "insertion", n_boot=300)
    best = s.best.set_index("method")
    assert best.loc["a", "best_cutoff"] == 8.0 and math.isinf(best.loc["b", "best_cutoff"])
    assert best.loc["a", "gain"] == pytest.approx(0.2, abs=0.02)
    assert best.loc["a", "gain_ci_low"] > 0.15 and best.loc["a", "gain_p"] == 0.0
    assert best.loc["b", "gain"] == 0.0 and best.loc["b", "gain_ci_low"] == 0.0
    assert len(s.curves) == 2 * len(CUTOFFS)

    d = cutoff_statistics(store, "deletion", n_boot=300).best.set_index("method")
    assert d.loc["a", "best_cutoff"] == 4.0
    assert d.loc["a", "gain"] == pytest.approx(0.15, abs=0.02)  # positive = better (lower AUC)


def test_cutoff_is_chosen_on_validation_images_and_reported_on_the_others(tmp_path):
    n = 300
    val = validation_mask(np.arange(n), 0.25, seed=0)
    v = np.full((n, len(CUTOFFS)), 0.5)
    v[val, 1] = 0.9  # validation images favour cutoff 2
    v[~val, 4] = 0.9  # test images favour cutoff 16
    store = write_store(tmp_path / "s.zarr", {"insertion": {"auc": {"a": v, "b": v}}}, n=n)
    best = cutoff_statistics(store, "insertion", n_boot=50).best.iloc[0]
    assert best["best_cutoff"] == 2.0
    assert best["test_best"] == pytest.approx(0.5) and best["test_unfiltered"] == pytest.approx(0.5)
    assert best["n_validation"] == val.sum() and best["n_test"] == (~val).sum()


def test_only_ok_images_of_done_units_are_used(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    v = rng.random((n, len(CUTOFFS)))
    ok = np.ones(n, bool)
    ok[[3, 17]] = False
    done = np.ones(6, np.uint8)
    done[4] = 0  # images 40..49
    polluted = v.copy()
    polluted[[3, 17]] = 1e6
    polluted[40:50] = np.nan
    store = write_store(tmp_path / "s.zarr", {"insertion": {"auc": {"a": polluted, "b": polluted}}},
                        n=n, ok=ok, done=done)
    keep = ok.copy()
    keep[40:50] = False
    t = load_metric(store, "insertion")
    np.testing.assert_array_equal(t.images, np.flatnonzero(keep))
    curves = cutoff_statistics(store, "insertion", n_boot=20).curves
    a = curves[curves["method"] == "a"]
    np.testing.assert_allclose(a["mean"], v[keep].mean(0).astype(np.float32), rtol=1e-6)
    assert (a["n"] == keep.sum()).all()


@pytest.mark.parametrize("exact_limit", [eval_stats.EXACT_LIMIT, 1])
def test_bootstrap_interval_matches_the_normal_approximation(monkeypatch, exact_limit):
    monkeypatch.setattr(eval_stats, "EXACT_LIMIT", exact_limit)  # 1: Poisson bootstrap path
    rng = np.random.default_rng(2)
    x = rng.exponential(1.0, size=(2000, 1))
    reps = bootstrap_means(x, n_boot=800, seed=0)[:, 0]
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert reps.mean() == pytest.approx(x.mean(), abs=0.3 * se)
    assert reps.std() == pytest.approx(se, rel=0.12)
    # paired: columns resampled with the same images, so an exact copy has zero spread
    pair = bootstrap_means(np.hstack([x, x + 1.0]), n_boot=50, seed=0)
    np.testing.assert_allclose(pair[:, 1] - pair[:, 0], 1.0, atol=1e-9)


def test_rankings_before_and_after_filtering(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    # unfiltered: "a" beats "b" on both metrics. "b" filtered at cutoff 4 beats everything.
    ins = {"a": peaked(n, None, 0, rng, base=0.6), "b": peaked(n, 2, 0.3, rng, base=0.4)}
    dele = {"a": peaked(n, None, 0, rng, base=0.2), "b": peaked(n, 2, -0.25, rng, base=0.3)}
    store = write_store(tmp_path / "s.zarr", {"insertion": {"auc": ins}, "deletion": {"auc": dele}}, n=n)
    r = rank_methods(store, n_boot=200)
    get = lambda metric, cond, method, col="rank": r[(r.metric == metric) & (r.condition == cond)
                                                     & (r.method == method)][col].item()
    for metric in ("insertion", "deletion", "mean rank"):
        assert get(metric, "unfiltered", "a") == 1.0 and get(metric, "unfiltered", "b") == 2.0
        assert get(metric, "filtered", "b") == 1.0 and get(metric, "filtered", "a") == 2.0
        # clear separations: the bootstrap intervals of the ranks are single points
        assert get(metric, "filtered", "b", "rank_ci_high") == 1.0
    assert get("insertion", "filtered", "b", "cutoff") == 4.0
    assert get("mean rank", "unfiltered", "a", "score") == 1.0
    # a coin toss: equal methods get wide rank intervals
    a = peaked(n, None, 0, rng)
    same = {"a": a, "b": a + 0.01 * (-1.0) ** np.arange(n)[:, None]}  # equal means, per-image noise
    store2 = write_store(tmp_path / "t.zarr", {"insertion": {"auc": same}}, n=n)
    r2 = rank_methods(store2, n_boot=200)
    row = r2[(r2.metric == "insertion") & (r2.condition == "unfiltered")]
    assert (row["rank_ci_low"] == 1.0).all() and (row["rank_ci_high"] == 2.0).all()


def feature_detection_arrays(n, acc, rng):
    """acc: (E, K) accuracies -> correct (n, cutoffs, E, K) Bernoulli, probability alike."""
    acc = np.asarray(acc)
    correct = (rng.random((n, len(CUTOFFS), *acc.shape)) < acc).astype(np.float32)
    return correct, correct * 0.8 + 0.1


def test_cross_architecture_matrix(tmp_path):
    rng = np.random.default_rng(4)
    n = 50
    dims = {o: ("evaluator", "keep") for o in ("correct", "probability")}
    stores, truth = {}, {}
    for name, acc in {"cnn": [[0.9, 0.95], [0.3, 0.6]], "vgg": [[0.8, 0.9], [0.5, 0.7]]}.items():
        other = "vgg" if name == "cnn" else "cnn"
        coords = {o: {"evaluator": ["self", other], "keep": [0.1, 0.4]} for o in ("correct", "probability")}
        correct, prob = feature_detection_arrays(n, acc, rng)
        score = prob[:, :, 0].mean(-1)
        truth[name] = correct
        stores[name] = write_store(tmp_path / f"{name}.zarr", {"feature_detection": {
            "correct": {"ig": correct}, "probability": {"ig": prob}, "score": {"ig": score}}},
            n=n, methods=("ig",), coords=coords, dims=dims, model=name)
    m = cross_architecture_matrix(stores)
    assert set(m["explainer"]) == {"cnn", "vgg"} and set(m["evaluator"]) == {"cnn", "vgg"}
    row = m[(m.explainer == "cnn") & (m.evaluator == "vgg") & (m.keep == 0.4)]
    assert row["accuracy"].item() == pytest.approx(truth["cnn"][:, 0, 1, 1].mean())
    diag = m[(m.explainer == "vgg") & (m.evaluator == "vgg") & (m.keep == 0.1)]
    assert diag["accuracy"].item() == pytest.approx(truth["vgg"][:, 0, 0, 0].mean())
    # one store on its own: named after its config's model; another cutoff
    single = cross_architecture_matrix(stores["cnn"], cutoff=8.0)
    assert set(single["explainer"]) == {"cnn"}
    assert single[(single.evaluator == "cnn") & (single.keep == 0.1)]["accuracy"].item() == pytest.approx(
        truth["cnn"][:, 3, 0, 0].mean())
    with pytest.raises(ValueError, match="stored cutoffs"):
        cross_architecture_matrix(stores["cnn"], cutoff=5.0)


def test_run_evaluation_writes_tables_and_figures(tmp_path):
    rng = np.random.default_rng(5)
    n = 80
    coords = {o: {"evaluator": ["self"], "keep": [0.2]} for o in ("correct", "probability")}
    dims = {o: ("evaluator", "keep") for o in ("correct", "probability")}
    correct, prob = feature_detection_arrays(n, [[0.7]], rng)
    metrics = {
        "insertion": {"auc": {"a": peaked(n, 1, 0.2, rng), "b": peaked(n, 0, 0.2, rng)},
                      "curve": {"a": rng.random((n, 5, 3)), "b": rng.random((n, 5, 3))}},
        "sparseness": {"gini": {"a": peaked(n, 4, 0.1, rng), "b": peaked(n, None, 0, rng)}},
        "feature_detection": {"correct": {"a": correct, "b": correct}, "probability": {"a": prob, "b": prob},
                              "score": {"a": prob[:, :, 0, 0], "b": prob[:, :, 0, 0]}},
    }
    store = write_store(tmp_path / "run1.zarr", metrics, n=n, coords=coords, dims=dims)
    summary = run_evaluation(store)
    out = tmp_path / "run1-outputs"
    assert summary["out_dir"] == str(out)
    for name in ("cutoff_curves.parquet", "best_cutoffs.parquet", "rankings.parquet", "cross_architecture.parquet",
                 "cutoff_curves_insertion.png", "cutoff_curves_sparseness.png", "rankings.png",
                 "cross_architecture.png", "evaluation.json"):
        assert (out / name).stat().st_size > 0, name
    best = pd.read_parquet(out / "best_cutoffs.parquet").set_index(["metric", "method"])
    assert best.loc[("insertion", "a"), "best_cutoff"] == 2.0
    assert best.loc[("sparseness", "a"), "best_cutoff"] == 16.0
    assert summary["best_cutoffs"]["insertion"]["b"] == "inf"
    assert json.loads((out / "evaluation.json").read_text())["n_images"] == n
    ranks = pd.read_parquet(out / "rankings.parquet")
    # map-only statistics (sparseness) get cutoff curves but stay out of the faithfulness ranking
    assert set(ranks["metric"]) == {"insertion", "feature_detection", "mean rank"}
    assert set(summary["ranked_on"]) == {"insertion", "feature_detection"}
