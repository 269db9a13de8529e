"""``run_evaluation``: every table and figure the evaluation produces for one store.

Files written to ``out_dir`` (default ``<store parent>/<store name>-outputs/``):

    cutoff_curves.parquet        metric, output, method, cutoff, mean, ci_low, ci_high,
                                 mean_validation, mean_test, n, n_validation, n_test
    best_cutoffs.parquet         metric, method, best_cutoff, test_unfiltered, test_best, gain, ...
    rankings.parquet             metric ("mean rank" included), condition, method, cutoff, score,
                                 rank, rank_ci_low, rank_ci_high, n_test
    cross_architecture.parquet   explainer, evaluator, method, keep, accuracy, probability, n
                                 (only when the store has feature_detection)
    cutoff_curves_<metric>.png   one figure per metric
    rankings.png                 the rank table
    cross_architecture.png       (with feature_detection)
    evaluation.json              the summary ``run_evaluation`` returns
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


from ..io.store import StoreError, outputs_dir
from .data import metric_names, open_store, store_path, usable_positions
from .plots import plot_cross_architecture, plot_cutoff_curves, plot_rank_table
from .rankings import NotScalarError, best_cutoffs, cross_architecture_matrix, cutoff_statistics, rank_methods


def default_out_dir(store: Any) -> Path:
    path = store if isinstance(store, str) else store_path(store)
    if path is None:
        raise ValueError("out_dir is needed when the store is not given by its path")
    return outputs_dir(str(path))


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


def run_evaluation(
    store: Any,
    out_dir: str | Path | None = None,
    *,
    validation_fraction: float = 0.25,
    seed: int = 0,
    n_boot: int = 1000,
    select_on: str | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Cutoff statistics for every metric, method rankings, the cross-architecture matrix;
    Parquet tables and (unless ``plots`` is False) PNG figures in ``out_dir``. Returns a summary
    (also ``evaluation.json``)."""
    import pandas as pd

    group = open_store(store)
    names = metric_names(group)
    if not names:
        raise StoreError(f"the store {str(store)!r} holds no metrics, so there is nothing to evaluate: add a "
                         "'metrics' section to the job config (e.g. metrics: {deletion: {}}) and run it into a new store")
    out = Path(out_dir) if out_dir is not None else default_out_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    scalar = []
    stats = []
    for metric in names:
        try:
            s = cutoff_statistics(group, metric, validation_fraction, seed, n_boot)
        except NotScalarError:  # e.g. a curve-valued metric: tables and figures of its own elsewhere
            continue
        stats.append(s)
        scalar.append(metric)
        if plots:
            files.append(str(plot_cutoff_curves(s.curves, s.best, metric, s.higher_is_better,
                                                out / f"cutoff_curves_{metric}.png")))
    curves = pd.concat([s.curves.assign(metric=s.metric, output=s.output) for s in stats], ignore_index=True)
    curves = curves[["metric", "output"] + [c for c in curves.columns if c not in ("metric", "output")]]
    best = pd.concat([s.best.assign(metric=s.metric) for s in stats], ignore_index=True)
    best = best[["metric"] + [c for c in best.columns if c != "metric"]]
    curves.to_parquet(out / "cutoff_curves.parquet", index=False)
    best.to_parquet(out / "best_cutoffs.parquet", index=False)
    files += [str(out / "cutoff_curves.parquet"), str(out / "best_cutoffs.parquet")]

    # Rank on what the model says (faithfulness); map-only statistics (sparseness, complexity)
    # describe the maps but are no verdict on them, so they stay out of the mean rank.
    from ..metrics.base import METRICS

    faithful = [m for m in scalar if m not in METRICS or METRICS.get(m).needs_model] or scalar
    ranks = rank_methods(group, faithful, validation_fraction, seed, n_boot, select_on=select_on)
    ranks.to_parquet(out / "rankings.parquet", index=False)
    files.append(str(out / "rankings.parquet"))
    if plots:
        files.append(str(plot_rank_table(ranks, out / "rankings.png")))

    summary: dict[str, Any] = {
        "out_dir": str(out),
        "n_images": int(len(usable_positions(group))),
        "metrics": scalar,
        "ranked_on": faithful,
        "best_cutoffs": {m: {k: _json_float(v) for k, v in d.items()} for m, d in best_cutoffs(stats).items()},
    }
    mean_rank = ranks[ranks["metric"] == "mean rank"]
    summary["top_method"] = {
        cond: str(rows.sort_values("score")["method"].iloc[0])
        for cond, rows in mean_rank.groupby("condition")
    }
    summary["gains"] = {
        f"{r.metric}/{r.method}": {"gain": r.gain, "ci": [r.gain_ci_low, r.gain_ci_high]}
        for r in best.itertuples()
    }
    if "feature_detection" in names:
        matrix = cross_architecture_matrix(group)
        matrix.to_parquet(out / "cross_architecture.parquet", index=False)
        files.append(str(out / "cross_architecture.parquet"))
        if plots:
            files.append(str(plot_cross_architecture(matrix, out / "cross_architecture.png")))
    summary["files"] = files
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2, default=float))
    summary["files"].append(str(out / "evaluation.json"))
    return summary
