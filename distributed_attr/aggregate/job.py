"""The aggregation job: dataset-wide spectra, filter effects and mean maps from a store.

Readers are Ray tasks, one per group of contiguous work units. Each task opens the store itself
with ``zarr.open_group(path, mode="r")``, reads whole shards (a run of done units in one call,
capped at ``READ_BYTES`` per call), keeps only images with ``ok`` in done units, and returns
small mergeable states (``GroupedMoments`` per method and quantity), never maps. The driver
merges the states as they arrive, derives slopes and high-frequency fractions, and is the only
writer: the store's ``aggregates/`` group, Parquet tables and PNG plots in ``out_dir``.

Per method, overall and per class (the class is ``target``, the class each map explains):
* radial spectrum at every cutoff (``spectra/<method>``, (cutoff, frequency)): mean, sample std,
  95 % CI half-width of the mean (1.96 std / sqrt n);
* from the *mean* spectrum: log-log slope (least squares of log10 power on log10 frequency over
  the bins with frequency > 0 and power > 0) and high-frequency fraction (energy above
  ``hf_cutoff`` cycles/pixel over non-DC energy, energy = power x bin count);
* per image, the same slope and fraction, aggregated (mean, std, CI);
* the stored per-image ``hf_fraction/<method>`` as written by the workers, aggregated;
* the mean and std map (``maps/<method>``).
A store without ``spectra/`` gets its spectra computed by the readers from the maps
(unfiltered = the raw map, then the config's sweep with its filter kind).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..io.derived import FilesAside, store_state
from ..io.store import AttributionStore, Keys, StoreError, outputs_dir
from .outputs import write_aggregates_group, write_plots, write_tables
from .plan import (
    READ_BYTES,
    THREADS,
    PartialAggregate,
    ReadPlan,
    arrays_read,
    damaged_shard_message,
    make_plan,
    reader_note,
)
from .reader import aggregate_units
from .results import Results, Scope, ScopeResult
from .schedule import aggregate_on_ray, local_cpus, plan_groups
from .spectra import hf_fraction_from_spectrum, loglog_slope
from .stats import Moments, MomentsResult

__all__ = ["run_aggregation", "aggregate_units", "plan_groups", "PartialAggregate", "READ_BYTES"]

#: per-class mean/std maps only up to this many classes: at 224 px one class costs 3 float64 maps
#: (count, mean, M2) of 50,176 values per method in every task's state, 1.2 GB per method for
#: ImageNet's 1,000 classes; spectra per class are small and always kept
CLASS_MAPS = 100
#: quantities aggregated per method besides the maps
QUANTITIES = ("spectrum", "image_slope", "image_hf_fraction", "stored_hf_fraction")


def _check_counts(store: str, plan: ReadPlan, partial: PartialAggregate, expected: int) -> None:
    """Aggregates count exactly the images they read: every usable image, every method's value."""
    if partial.images != expected:
        raise StoreError(f"read {partial.images} usable images from {store!r} but the store lists {expected}; "
                         "the store changed while it was read, or is damaged: run `distributed-attr inspect --verify`")
    for m in plan.methods:
        for q, state in (partial.stats.get(m) or {}).items():
            if q not in ("spectrum", "map") or state.count is None or not state.count.size:
                continue
            counted = int(state.count.sum(axis=0).min())
            if counted != partial.images:
                raise StoreError(f"{m}: {partial.images - counted} of {partial.images} usable images have no finite "
                                 f"{q} values (NaN where data should be); refusing to average over the others. "
                                 f"Run `distributed-attr inspect --verify {store}`")


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _default_out_dir(store: str) -> Path:
    return outputs_dir(store)


def _count_classes(handle: AttributionStore, usable: np.ndarray) -> int:
    """Distinct ``target`` classes of the usable images (8 bytes per image read)."""
    return int(np.unique(np.asarray(handle.group[Keys.TARGET][:])[usable]).size)


def run_aggregation(
    store: str,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    out_dir: str | None = None,
    read_maps: bool = True,
    units_per_task: int = 64,
    plots: bool = True,
    threads: int | None = None,
    class_maps: int = CLASS_MAPS,
    partial: bool = False,
) -> dict:
    """Aggregate a store; returns a summary dict (paths, counts, timings, headline numbers).

    ``num_workers``: reader tasks in flight (None: the cluster's CPUs; 0: in this process,
    without Ray). ``address``: a Ray cluster to join ("auto" under ``ray job submit``); Ray is
    started locally when it is not running yet (and shut down again at the end). ``out_dir``:
    Parquet tables and PNG plots (default ``<store parent>/<store stem>-outputs``).
    ``read_maps=False`` skips the mean maps (reads only the small spectral arrays).
    ``units_per_task``: at most this many units per reader task (and at least one task per
    worker): a lost task costs little to redo and fast workers take more tasks.
    ``threads``: threads per reader task (default ``THREADS`` = 2: reading the next block while
    reducing this one); each task reserves that many CPUs from Ray (capped at the largest node's),
    and the default ``num_workers`` is the cluster's CPUs divided by it. 1 = strictly one core
    per task. ``class_maps``: mean/std maps per class when the maps explain at most this many
    classes (counted by the driver from ``target``), else the overall mean/std map only.
    ``partial``: aggregate a store that is not complete (or that a job is still writing) over the
    units done so far; without it such a store is refused (``StoreError``). Every output records
    the store state it read (``io/derived.py``: generation, units done, partial), and a partial
    one says so in its plots' titles; the outputs are written aside and switched into place."""
    t_start = time.perf_counter()
    store = str(store)
    handle = AttributionStore.open(store, mode="r")
    root = handle.group
    plan = make_plan(store, root, read_maps)
    plan.threads = THREADS if threads is None else int(threads)
    if plan.threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    done = handle.done_units()
    state = store_state(handle, store, done=done)  # the generation was read before the done flags
    state.require_complete(partial, "aggregate")
    record = state.record()
    # A missing shard reads as fill values (NaN maps, ok=False): refuse before averaging over it.
    # Damaged shards fail their checksum or codec while being read (below).
    missing = handle.verify(decode=False, arrays=arrays_read(plan))
    if missing:
        raise StoreError(damaged_shard_message(store, missing))
    usable = handle.usable()
    # only the units read as done above: a job still writing (--partial) may commit more meanwhile
    read = np.zeros(handle.n_units, dtype=bool)
    read[done] = True
    usable &= np.repeat(read, handle.unit_size)[: handle.n_images]
    expected_images = int(usable.sum())
    if plan.read_maps:
        plan.class_maps = _count_classes(handle, usable) <= class_maps
    t_read = time.perf_counter()
    if num_workers == 0:
        workers = 0
        partial = PartialAggregate()
        for group in plan_groups(done, 1):
            partial.merge(aggregate_units(plan, group))
    else:
        from ..ray_session import ray_session

        with ray_session(address, num_cpus=local_cpus(num_workers, plan.threads),
                         object_store_memory=100 * 1024 * 1024):
            workers, partial = aggregate_on_ray(plan, done, num_workers, units_per_task)
    read_seconds = time.perf_counter() - t_read
    _check_counts(store, plan, partial, expected_images)

    results = _finalise(plan, partial)
    out = Path(out_dir) if out_dir else _default_out_dir(store)
    t_write = time.perf_counter()
    # Everything is written aside, then switched into place: a failure (a full disk) leaves the
    # previous outputs as they were, and no reader ever sees half of them (io/derived.py).
    group = write_aggregates_group(store, plan, results, done, record)
    files = None
    try:
        files = FilesAside(out, "aggregate")
        tables = {k: str(out / Path(v).name) for k, v in write_tables(files.aside, plan, results, record).items()}
        figures = [str(out / Path(f).name) for f in
                   (write_plots(files.aside, plan, results, record) if plots and results else [])]
        group.commit()
        files.commit({**record, "store": store, "units_aggregated": int(partial.units), "images": int(partial.images),
                      "methods": list(results), "tables": tables, "plots": figures})
    except BaseException:
        group.abort()
        if files is not None:
            files.abort()
        raise
    write_seconds = time.perf_counter() - t_write
    headline = {
        m: {
            "n_images": r["all"].n,
            "slope_unfiltered": _round(r["all"].slope[0]),
            "hf_fraction_unfiltered": _round(r["all"].hf_fraction[0]),
        }
        for m, r in results.items()
    }
    return {
        "store": store,
        "partial": record["partial"],
        "units_done": record["units_done"],
        "n_units": record["n_units"],
        "store_generation": record["store_generation"],
        "out_dir": str(out),
        "workers": workers,
        "threads_per_worker": plan.threads,
        "class_maps": bool(plan.read_maps and plan.class_maps),
        "units": int(partial.units),
        "images": int(partial.images),
        "methods": plan.methods,
        "hf_cutoff": plan.hf_cutoff,
        "spectra_source": "store" if plan.have_spectra else "computed from maps",
        "shard_reader": reader_note(store, plan),
        "summary": headline,
        "tables": tables,
        "plots": figures,
        "bytes_read": int(partial.bytes_read),
        "read_seconds": round(read_seconds, 4),
        "write_seconds": round(write_seconds, 4),
        "seconds": round(time.perf_counter() - t_start, 4),
        "maps_per_s": round(partial.images * len(plan.methods) / read_seconds, 1) if read_seconds > 0 else None,
        "mb_per_s": round(partial.bytes_read / 1e6 / read_seconds, 1) if read_seconds > 0 else None,
    }


def _round(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def _scope_result(plan: ReadPlan, states: dict[str, Moments]) -> ScopeResult:
    """Everything derived for one scope (all images, or one class) of one method."""
    freqs = np.asarray(plan.frequencies)
    spec: MomentsResult = states["spectrum"].compute()
    slope, intercept = loglog_slope(freqs, spec.mean)
    optional = {q: states[q].compute() for q in (*ScopeResult.PER_IMAGE, "map") if q in states}
    return ScopeResult(
        n=int(spec.count.max()) if spec.count.size else 0,
        spectrum=spec,
        slope=slope,
        intercept=intercept,
        hf_fraction=hf_fraction_from_spectrum(freqs, spec.mean, np.asarray(plan.counts), plan.hf_cutoff),
        **optional,
    )


def _finalise(plan: ReadPlan, partial: PartialAggregate) -> Results:
    results: Results = {}
    for m in plan.methods:
        per_q = partial.stats.get(m) or {}
        if "spectrum" not in per_q:
            continue
        scopes: dict[Scope, ScopeResult] = {"all": _scope_result(plan, {q: g.total() for q, g in per_q.items()})}
        groups = {q: g.groups for q, g in per_q.items()}  # built once: a property that copies
        for cls in per_q["spectrum"].keys():
            scopes[int(cls)] = _scope_result(plan, {q: gq[cls] for q, gq in groups.items() if cls in gq})
        results[m] = scopes
    return results
