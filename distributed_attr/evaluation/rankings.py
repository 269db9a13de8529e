"""Which explanation is most faithful, and does low-pass filtering (FORGrad) change the answer?

``cutoff_statistics``: for one metric, the mean score of every method at every filter cutoff; the
cutoff that is best for each method, chosen on a validation subset of images and reported on the
other images with a bootstrap confidence interval, and its gain over the unfiltered map (paired
bootstrap: the same resampled images on both sides).

``rank_methods``: methods ranked per metric and by their mean rank across metrics, before
filtering and after (each method at its validation-chosen cutoff), with bootstrap intervals on
the ranks.

``cross_architecture_matrix``: feature-detection accuracy of every evaluator on the features of
every explaining model, at each keep level.

"Best" follows each metric's direction (``higher_is_better``): for deletion the best cutoff is
the one with the lowest AUC. Ties go to the earliest stored cutoff, i.e. the unfiltered map
(stored first), so a filter is chosen only when it helps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .data import MetricTable, load_metric, metric_names, model_name, open_store
from .stats import bootstrap_means, percentile_ci, rank_rows, validation_mask


@dataclass
class CutoffStatistics:
    """``curves``: one row per (method, cutoff); ``best``: one row per method."""

    metric: str
    output: str
    higher_is_better: bool
    curves: pd.DataFrame
    best: pd.DataFrame


class NotScalarError(ValueError):
    """A metric output with trailing dimensions (a curve, a matrix): it has no cutoff statistics."""


def _score_matrix(table: MetricTable, method: str) -> np.ndarray:
    v = table.values[method]
    if v.ndim != 2:
        raise NotScalarError(
            f"{table.metric}/{table.output} has trailing dims {table.dims}; statistics need a scalar output "
            f"(the metric's score output)"
        )
    return v


def _split(table: MetricTable, fraction: float, seed: int) -> np.ndarray:
    return validation_mask(table.images, fraction, seed)


def _choose(means: np.ndarray, higher_is_better: bool) -> int:
    """Index of the best mean; the first on ties (np.argmax/argmin return the first)."""
    return int(np.nanargmax(means) if higher_is_better else np.nanargmin(means))


def cutoff_statistics(
    store: Any,
    metric: str,
    validation_fraction: float = 0.25,
    seed: int = 0,
    n_boot: int = 1000,
    *,
    output: str | None = None,
    methods: Sequence[str] | None = None,
) -> CutoffStatistics:
    """Mean score per method and cutoff, and the validation-chosen best cutoff per method.

    ``curves`` columns: method, cutoff, mean, ci_low, ci_high (bootstrap 95% over all usable
    images), mean_validation, mean_test, n, n_validation, n_test.
    ``best`` columns: method, best_cutoff, mean_validation_best, test_unfiltered, test_best,
    test_best_ci_low/high, gain (test_best - test_unfiltered, signed so that > 0 means better),
    gain_ci_low/high (paired bootstrap), gain_p (bootstrap share of replicates with gain <= 0),
    n_validation, n_test.
    """
    table = load_metric(store, metric, output, list(methods) if methods else None)
    sign = 1.0 if table.higher_is_better else -1.0
    is_val = _split(table, validation_fraction, seed)
    k_unf = table.unfiltered_index
    curve_rows, best_rows = [], []
    for mi, method in enumerate(table.methods):
        v = _score_matrix(table, method)
        finite = np.isfinite(v).all(axis=1)
        v, val = v[finite], is_val[finite]
        n_val, n_test = int(val.sum()), int((~val).sum())
        if n_val == 0 or n_test == 0:
            raise ValueError(
                f"{metric}/{method}: {len(v)} usable images give {n_val} validation and {n_test} test images; "
                f"both need at least one (change validation_fraction or process more images)"
            )
        boot_all = bootstrap_means(v, n_boot, seed + 7919 * mi)
        lo, hi = percentile_ci(boot_all)
        mean_val, mean_test = v[val].mean(0), v[~val].mean(0)
        for k, cutoff in enumerate(table.cutoffs):
            curve_rows.append(dict(
                method=method, cutoff=float(cutoff), mean=float(v[:, k].mean()),
                ci_low=float(lo[k]), ci_high=float(hi[k]),
                mean_validation=float(mean_val[k]), mean_test=float(mean_test[k]),
                n=int(len(v)), n_validation=n_val, n_test=n_test,
            ))
        best = _choose(mean_val, table.higher_is_better)
        test = v[~val]
        pair = np.stack([test[:, best], test[:, k_unf]], axis=1)
        boot = bootstrap_means(pair, n_boot, seed + 7919 * mi + 1)
        gains = sign * (boot[:, 0] - boot[:, 1]) + 0.0  # + 0.0 turns -0.0 into 0.0
        b_lo, b_hi = percentile_ci(boot[:, 0])
        g_lo, g_hi = percentile_ci(gains)
        best_rows.append(dict(
            method=method, best_cutoff=float(table.cutoffs[best]),
            mean_validation_best=float(mean_val[best]),
            test_unfiltered=float(test[:, k_unf].mean()), test_best=float(test[:, best].mean()),
            test_best_ci_low=float(b_lo), test_best_ci_high=float(b_hi),
            gain=float(sign * (test[:, best].mean() - test[:, k_unf].mean())) + 0.0,
            gain_ci_low=float(g_lo), gain_ci_high=float(g_hi), gain_p=float((gains <= 0).mean()),
            n_validation=n_val, n_test=n_test,
        ))
    return CutoffStatistics(metric, table.output, table.higher_is_better,
                            pd.DataFrame(curve_rows), pd.DataFrame(best_rows))


def rank_methods(
    store: Any,
    metrics: Sequence[str] | None = None,
    validation_fraction: float = 0.25,
    seed: int = 0,
    n_boot: int = 1000,
    *,
    select_on: str | None = None,
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Methods ranked per metric and by mean rank across metrics, unfiltered and filtered.

    Rank 1 is the best. "filtered" puts each method at the cutoff chosen on the validation images
    (by the same metric, or by ``select_on`` for every metric, as FORGrad selects its cutoff on one
    faithfulness score); all ranks are computed on the test images, and the bootstrap resamples
    those images jointly for every metric, so the interval of the mean rank accounts for the
    metrics' correlation.

    Columns: metric ("mean rank" for the across-metric rows), condition ("unfiltered" |
    "filtered"), method, cutoff, score (mean on test images; the mean rank for "mean rank" rows),
    rank, rank_ci_low, rank_ci_high, n_test.
    """
    group = open_store(store)
    metrics = list(metrics) if metrics else metric_names(group)
    if not metrics:
        raise ValueError("the store holds no metrics")
    tables = {m: load_metric(group, m, methods=list(methods) if methods else None) for m in metrics}
    if select_on is not None and select_on not in tables:
        tables[select_on] = load_metric(group, select_on, methods=list(methods) if methods else None)
    method_list = tables[metrics[0]].methods
    for m, t in tables.items():
        if t.methods != method_list:
            raise ValueError(f"metric {m!r} covers methods {t.methods}, {metrics[0]!r} covers {method_list}")
    images = tables[metrics[0]].images
    finite = np.ones(len(images), dtype=bool)
    for t in tables.values():
        for method in method_list:
            finite &= np.isfinite(_score_matrix(t, method)).all(axis=1)
    is_val = validation_mask(images, validation_fraction, seed)
    val, test = finite & is_val, finite & ~is_val
    if val.sum() == 0 or test.sum() == 0:
        raise ValueError(f"{int(finite.sum())} usable images give {int(val.sum())} validation and "
                         f"{int(test.sum())} test images; both need at least one")

    # Chosen cutoff per (selection metric, method), on validation images.
    chosen: dict[tuple[str, str], int] = {}
    for m in metrics:
        sel = tables[select_on or m]
        for method in method_list:
            chosen[(m, method)] = _choose(sel.values[method][val].mean(0), sel.higher_is_better)

    # One column per (metric, condition, method), test images only; one bootstrap for all.
    conditions = ("unfiltered", "filtered")
    columns, keys = [], []
    for m in metrics:
        t = tables[m]
        for cond in conditions:
            for method in method_list:
                sel_cutoffs = tables[select_on or m].cutoffs
                k = t.unfiltered_index if cond == "unfiltered" else t.cutoff_index(float(sel_cutoffs[chosen[(m, method)]]))
                columns.append(t.values[method][test, k])
                keys.append((m, cond, method, float(t.cutoffs[k])))
    data = np.stack(columns, axis=1)
    point = data.mean(0)
    boot = bootstrap_means(data, n_boot, seed)
    n_methods = len(method_list)
    rows = []
    rank_point: dict[str, list[np.ndarray]] = {c: [] for c in conditions}
    rank_boot: dict[str, list[np.ndarray]] = {c: [] for c in conditions}
    for mi, m in enumerate(metrics):
        higher = tables[m].higher_is_better
        for ci, cond in enumerate(conditions):
            sl = slice((mi * 2 + ci) * n_methods, (mi * 2 + ci + 1) * n_methods)
            rp = rank_rows(point[sl], higher)
            rb = rank_rows(boot[:, sl], higher)
            rank_point[cond].append(rp)
            rank_boot[cond].append(rb)
            lo, hi = percentile_ci(rb)
            for j, method in enumerate(method_list):
                key = keys[sl.start + j]
                rows.append(dict(metric=m, condition=cond, method=method, cutoff=key[3],
                                 score=float(point[sl][j]), rank=float(rp[j]),
                                 rank_ci_low=float(lo[j]), rank_ci_high=float(hi[j]), n_test=int(test.sum())))
    for cond in conditions:
        mean_rank = np.mean(rank_point[cond], axis=0)
        mean_rank_boot = np.mean(rank_boot[cond], axis=0)
        order = rank_rows(mean_rank, higher_is_better=False)
        lo, hi = percentile_ci(rank_rows(mean_rank_boot, higher_is_better=False))
        for j, method in enumerate(method_list):
            rows.append(dict(metric="mean rank", condition=cond, method=method, cutoff=math.nan,
                             score=float(mean_rank[j]), rank=float(order[j]),
                             rank_ci_low=float(lo[j]), rank_ci_high=float(hi[j]), n_test=int(test.sum())))
    return pd.DataFrame(rows)


def _as_named_stores(stores: Any) -> list[tuple[str, Any]]:
    if isinstance(stores, Mapping):
        return [(str(name), s) for name, s in stores.items()]
    if isinstance(stores, (list, tuple)):
        out = []
        for s in stores:
            g = open_store(s)
            out.append((model_name(g), g))
        return out
    g = open_store(stores)
    return [(model_name(g), g)]


def cross_architecture_matrix(
    stores: Any,
    cutoff: float = math.inf,
    *,
    metric: str = "feature_detection",
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Feature-detection accuracy, explaining model x evaluator, per method and keep level.

    ``stores``: one store, a list of stores (named by their config's model name) or a mapping
    name -> store (one per explaining model). The evaluator "self" is reported under the
    explaining model's name, so the diagonal holds each model's own accuracy.

    Columns: explainer, evaluator, method, keep, accuracy, probability, n.
    """
    rows = []
    for explainer, store in _as_named_stores(stores):
        correct = load_metric(store, metric, "correct", list(methods) if methods else None)
        prob = load_metric(store, metric, "probability", list(methods) if methods else None)
        k = correct.cutoff_index(cutoff)
        # "self" is the explaining model: name it so the matrix has a diagonal; an evaluator that
        # happens to share that name keeps a distinct label
        evaluators = [explainer if e == "self" else (f"{e} (evaluator)" if str(e) == explainer else str(e))
                      for e in correct.coords.get("evaluator", [])]
        keeps = [float(v) for v in correct.coords.get("keep", [])]
        for method in correct.methods:
            c = correct.values[method][:, k]  # (n, E, K)
            p = prob.values[method][:, k]
            if not evaluators:
                evaluators = [explainer] + [f"evaluator_{i}" for i in range(1, c.shape[1])]
            if not keeps:
                keeps = list(range(c.shape[2]))
            for e, ev in enumerate(evaluators):
                for j, keep in enumerate(keeps):
                    ok = np.isfinite(c[:, e, j])
                    rows.append(dict(explainer=explainer, evaluator=ev, method=method, keep=keep,
                                     accuracy=float(c[ok, e, j].mean()) if ok.any() else math.nan,
                                     probability=float(np.nanmean(p[ok, e, j])) if ok.any() else math.nan,
                                     n=int(ok.sum())))
    return pd.DataFrame(rows)


def best_cutoffs(stats: Iterable[CutoffStatistics]) -> dict[str, dict[str, float]]:
    """``{metric: {method: best cutoff}}`` from several ``cutoff_statistics`` results."""
    return {s.metric: dict(zip(s.best["method"], s.best["best_cutoff"])) for s in stats}
