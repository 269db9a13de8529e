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
    evaluation.json              the summary ``run_evaluation`` returns, with the store state it
                                 read (io/derived.py); written last: the set's manifest

Every table records the store state in its Parquet schema metadata, a partial evaluation says so in
its figures' titles, and the files are written aside and switched into place
(``io.derived.FilesAside``), so that ``report`` never shows half of them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


from ..io.derived import FilesAside, store_state, title_note, write_parquet
from ..io.store import AttributionStore, StoreError, outputs_dir
from .data import _handle, metric_names, reading_units, store_path, usable_positions
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
    partial: bool = False,
) -> dict[str, Any]:
    """Cutoff statistics for every metric, method rankings, the cross-architecture matrix;
    Parquet tables and (unless ``plots`` is False) PNG figures in ``out_dir``. Returns a summary
    (also ``evaluation.json``). ``partial``: evaluate a store that is not complete (or that a job
    is still writing) over the units done so far; without it such a store is refused
    (``StoreError``)."""
    if isinstance(store, (str, Path)):
        handle = AttributionStore.open(str(store), mode="r")
        path = str(store)
    else:
        handle = _handle(store)
        path = str(store_path(store) or "<store>")
    group = handle.group
    names = metric_names(group)
    if not names:
        raise StoreError(f"the store {path!r} holds no metrics, so there is nothing to evaluate: add a "
                         "'metrics' section to the job config (e.g. metrics: {deletion: {}}) and run it into a new store")
    done = handle.done_units()  # after the generation (read when the handle opened), once
    state = store_state(handle, path, done=done)
    state.require_complete(partial, "evaluate")
    record = state.record()
    out = Path(out_dir) if out_dir is not None else default_out_dir(store)
    aside = FilesAside(out, "evaluation")
    try:
        # every metric read over the units recorded, also while a job commits more (--partial)
        with reading_units(group, done):
            return _evaluate(group, out, aside, record, validation_fraction, seed, n_boot, select_on, plots)
    except BaseException:
        aside.abort()
        raise


def _evaluate(group: Any, out: Path, aside: FilesAside, record: dict[str, Any], validation_fraction: float,
              seed: int, n_boot: int, select_on: str | None, plots: bool) -> dict[str, Any]:
    """``run_evaluation``'s work: every file written aside (``aside.path``), listed by the path it
    will have (``out``), switched into place at the end."""
    import pandas as pd

    names = metric_names(group)
    note = title_note(record)
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
            plot_cutoff_curves(s.curves, s.best, metric, s.higher_is_better, aside.path(f"cutoff_curves_{metric}.png"),
                               note)
            files.append(str(out / f"cutoff_curves_{metric}.png"))
    curves = pd.concat([s.curves.assign(metric=s.metric, output=s.output) for s in stats], ignore_index=True)
    curves = curves[["metric", "output"] + [c for c in curves.columns if c not in ("metric", "output")]]
    best = pd.concat([s.best.assign(metric=s.metric) for s in stats], ignore_index=True)
    best = best[["metric"] + [c for c in best.columns if c != "metric"]]
    write_parquet(curves, aside.path("cutoff_curves.parquet"), record)
    write_parquet(best, aside.path("best_cutoffs.parquet"), record)
    files += [str(out / "cutoff_curves.parquet"), str(out / "best_cutoffs.parquet")]

    # Rank on what the model says (faithfulness); map-only statistics (sparseness, complexity)
    # describe the maps but are no verdict on them, so they stay out of the mean rank.
    from ..metrics.base import METRICS

    faithful = [m for m in scalar if m not in METRICS or METRICS.get(m).needs_model] or scalar
    ranks = rank_methods(group, faithful, validation_fraction, seed, n_boot, select_on=select_on)
    write_parquet(ranks, aside.path("rankings.parquet"), record)
    files.append(str(out / "rankings.parquet"))
    if plots:
        plot_rank_table(ranks, aside.path("rankings.png"), note)
        files.append(str(out / "rankings.png"))

    summary: dict[str, Any] = {
        **record,
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
        write_parquet(matrix, aside.path("cross_architecture.parquet"), record)
        files.append(str(out / "cross_architecture.parquet"))
        if plots:
            plot_cross_architecture(matrix, aside.path("cross_architecture.png"), note)
            files.append(str(out / "cross_architecture.png"))
    summary["files"] = files
    # the manifest, written last (complete: true once every file is in place)
    aside.commit(json.loads(json.dumps(summary, default=float)))
    summary["files"].append(str(out / "evaluation.json"))
    return summary
