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

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from threadpoolctl import threadpool_limits

from ..io.storage import is_remote
from ..spectral.radial import NUMERICAL_FLOOR  # one floor for the torch and NumPy spectral maths
from ..io.store import AttributionStore, Keys, StoreError, open_group, outputs_dir
from .stats import GroupedMoments, Moments, MomentsResult

__all__ = ["run_aggregation", "aggregate_units", "plan_groups", "PartialAggregate", "READ_BYTES"]

#: about the most decoded bytes one block holds (whole units only; at least one unit); a task
#: holds two blocks. Fewer, bigger blocks pay the per-block grouping fewer times (measured on
#: the benchmark store: 3-unit blocks 1.3x slower than 4-unit ones)
READ_BYTES = 64 << 20
#: per-class mean/std maps only up to this many classes: at 224 px one class costs 3 float64 maps
#: (count, mean, M2) of 50,176 values per method in every task's state, 1.2 GB per method for
#: ImageNet's 1,000 classes; spectra per class are small and always kept
CLASS_MAPS = 100
#: threads a reader task uses: that many read arrays of the next block while as many reduce the
#: current block's methods (file reads, zstd and NumPy's loops release the GIL); 1 = everything in
#: the task's own thread, one core (what the scaling benchmark uses)
THREADS = 2
#: default frequency (cycles per pixel) above which power counts as high-frequency: the Nyquist
#: frequency of a stride-2 stage, i.e. the band a 2x subsampling aliases into
DEFAULT_HF_CUTOFF = 0.25
#: quantities aggregated per method besides the maps
QUANTITIES = ("spectrum", "image_slope", "image_hf_fraction", "stored_hf_fraction")


# ------------------------------------------------------------------------------------------------
# Pure helpers (NumPy, also used by the tests' expectations through their definitions)
# ------------------------------------------------------------------------------------------------


def loglog_slope(freqs: np.ndarray, power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept of log10(power) on log10(freq) along the last axis, over
    the bins with freq > 0 and finite power above ``NUMERICAL_FLOOR`` x the largest bin (DC
    included): a low-pass filter leaves the bins above its cutoff at rounding level, and those
    would otherwise dominate the fit. NaN where fewer than two bins qualify (or the spectrum is
    NaN)."""
    f = np.asarray(freqs, dtype=np.float64)
    p = np.asarray(power, dtype=np.float64)
    lead = p.shape[:-1]
    p2 = p.reshape(-1, f.size)
    # natural logs (NumPy's log is ~2x faster than log10): the slope does not depend on the base,
    # the intercept is converted to log10 at the end
    x = np.log(np.where(f > 0, f, 1.0))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        floor = NUMERICAL_FLOOR * p2.max(axis=1, keepdims=True)  # NaN rows: every test below fails
        use = (p2 > floor) & (p2 > 0) & (p2 < np.inf) & (f > 0)
        y = np.log(np.where(use, p2, 1.0))  # 0 where unused, so plain sums skip those bins
        w = use.astype(np.float64)
        n = w.sum(axis=1)
        sx, sxx = w @ x, w @ (x * x)
        sy, sxy = y.sum(axis=1), y @ x
        den = n * sxx - sx * sx
        ok = (n >= 2) & (den > 0)
        slope = np.where(ok, (n * sxy - sx * sy) / np.where(ok, den, 1.0), np.nan)
        intercept = np.where(ok, (sy - slope * sx) / np.maximum(n, 1), np.nan) / math.log(10)
    return slope.reshape(lead), intercept.reshape(lead)


def hf_fraction_from_spectrum(
    freqs: np.ndarray, power: np.ndarray, counts: np.ndarray, cutoff: float
) -> np.ndarray:
    """Energy above ``cutoff`` cycles/pixel over non-DC energy, along the last axis (the NumPy
    twin of ``spectral.high_frequency_fraction_from_spectrum``); 0 where the non-DC energy is
    at most ``NUMERICAL_FLOOR`` x the total (a constant map, up to rounding), NaN where the
    spectrum is NaN."""
    f = np.asarray(freqs, dtype=np.float64)
    p = np.asarray(power, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    # energies as three dot products with the bin counts (no (n, K, F) temporaries)
    high = p @ (c * ((f > cutoff) & (f > 0)))
    total = p @ (c * (f > 0))
    everything = p @ c
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total <= NUMERICAL_FLOOR * everything, 0.0, high / total)


def plan_groups(units: Iterable[int], n_groups: int) -> list[list[int]]:
    """Split sorted unit indices into ``n_groups`` contiguous groups of near-equal size."""
    units = sorted(int(u) for u in units)
    n_groups = max(1, min(n_groups, len(units)))
    bounds = np.linspace(0, len(units), n_groups + 1).round().astype(int)
    return [units[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _runs(units: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [first, last] of sorted unit indices."""
    runs: list[tuple[int, int]] = []
    for u in units:
        if runs and u == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], u)
        else:
            runs.append((u, u))
    return runs


# ------------------------------------------------------------------------------------------------
# What the driver tells each reader, and what a reader sends back
# ------------------------------------------------------------------------------------------------


@dataclass
class ReadPlan:
    store: str
    unit_size: int
    n_images: int
    methods: list[str]
    image_shape: tuple[int, int, int]
    have_spectra: bool
    have_stored_hf: bool
    hf_cutoff: float
    cutoffs: list[float]  # cycles per image; inf first
    frequencies: list[float]
    counts: list[float]  # coefficients per frequency bin (for energies)
    filter_kind: str = "forgrad"
    filter_order: int = 2
    read_maps: bool = True
    class_maps: bool = True  # mean/std maps per class as well as overall
    read_bytes: int = READ_BYTES
    threads: int = THREADS
    fast_reads: bool = True  # ShardReader for arrays in the store's own layout (else zarr only)
    storage_options: dict[str, Any] | None = None  # for a store on object storage


@dataclass
class PartialAggregate:
    """Mergeable per-method states from one group of units, plus what it cost to read them."""

    stats: dict[str, dict[str, GroupedMoments]] = field(default_factory=dict)
    images: int = 0
    units: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def merge(self, other: "PartialAggregate") -> "PartialAggregate":
        for method, per_q in other.stats.items():
            mine = self.stats.setdefault(method, {})
            for q, state in per_q.items():
                if q in mine:
                    mine[q].merge(state)
                else:
                    mine[q] = state
        self.images += other.images
        self.units += other.units
        self.bytes_read += other.bytes_read
        self.seconds += other.seconds
        return self


def _spectra_from_maps(maps: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """(n, K, F) spectra computed from maps when the store has none (same recipe as the
    workers: unfiltered = the raw map, then the sweep with the config's filter)."""
    import torch

    from ..spectral import cutoff_sweep_spectra, radial_spectrum

    x = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    out = np.empty((x.shape[0], len(plan.cutoffs), len(plan.frequencies)), dtype=np.float32)
    finite = [k for k, c in enumerate(plan.cutoffs) if not math.isinf(c)]
    for k, c in enumerate(plan.cutoffs):
        if math.isinf(c):
            out[:, k] = radial_spectrum(x)[1].numpy()
    if finite:
        _, sweep = cutoff_sweep_spectra(x, [plan.cutoffs[k] for k in finite], kind=plan.filter_kind,
                                        order=plan.filter_order)
        out[:, finite] = sweep.numpy()
    return out


def _blocks(units: list[int], units_per_read: int) -> list[tuple[int, int]]:
    """Read calls: runs of contiguous units cut into blocks of at most ``units_per_read``."""
    out = []
    for first, last in _runs(units):
        for u0 in range(first, last + 1, units_per_read):
            out.append((u0, min(last, u0 + units_per_read - 1)))
    return out


class _BlockReader:
    """Reads blocks of whole units of every array the job needs into two alternating sets of
    reusable buffers: one is filled (by ``threads`` threads, an array each) while the caller
    reduces the other.

    Arrays in the store's own layout go through ``ShardReader`` (one file read per shard, zstd
    straight into the buffer; both release the GIL); anything else through zarr's
    ``array[start:stop]``."""

    def __init__(self, plan: ReadPlan, arrays: dict[str, Any], units_per_read: int, threads: int,
                 fast: bool = True):
        from ..io.shard_reader import ShardReader

        self.plan = plan
        self.arrays = arrays
        self.readers: dict[str, Any] = {}
        for name, arr in arrays.items():
            reader = ShardReader.for_array(arr) if fast else None
            # a block is whole units, so a shard must be exactly one unit for the fast path
            if reader is not None and reader.rows_per_chunk == plan.unit_size:
                self.readers[name] = reader
        self.buffers = [{name: r.buffer(units_per_read) for name, r in self.readers.items()} for _ in range(2)]
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-reader") if threads > 1 else None

    def submit(self, block: tuple[int, int], slot: int) -> dict[str, Any]:
        """Start reading ``block`` (first and last unit) into buffer set ``slot``."""
        start = block[0] * self.plan.unit_size
        stop = min(self.plan.n_images, (block[1] + 1) * self.plan.unit_size)
        futures = {}
        for name, arr in self.arrays.items():
            reader = self.readers.get(name)
            if reader is not None:
                job = (self._fast, reader, block, self.buffers[slot][name], stop - start)
            else:
                job = (arr.__getitem__, slice(start, stop))
            if self.pool:
                futures[name] = self.pool.submit(*job)
            else:  # threads=1: read now, in this thread
                futures[name] = Future()
                futures[name].set_result(job[0](*job[1:]))
        return futures

    @staticmethod
    def _fast(reader: Any, block: tuple[int, int], buffer: np.ndarray, rows: int) -> np.ndarray:
        return reader.read(block[0], block[1], buffer)[:rows]

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True)


def _reduce_method(plan: ReadPlan, stats: dict[str, GroupedMoments], method: str, got: dict[str, np.ndarray],
                   keep: np.ndarray, keys: np.ndarray) -> None:
    """Fold one method's part of a block (the rows ``keep``) into its states ``stats``."""
    freqs = np.asarray(plan.frequencies)
    maps = got[Keys.maps(method)][keep] if Keys.maps(method) in got else None
    if maps is not None and plan.read_maps:
        # without class maps, one group under a key no class has: only the overall map survives
        map_keys = keys if plan.class_maps else np.full(keys.shape, "all")
        stats.setdefault("map", GroupedMoments()).update(maps, map_keys, skip_nan=True)
    if Keys.spectra(method) in got:
        spectra = got[Keys.spectra(method)][keep].astype(np.float64)
    else:
        spectra = _spectra_from_maps(maps, plan).astype(np.float64)
    stats.setdefault("spectrum", GroupedMoments()).update(spectra, keys, skip_nan=True)
    slope, _ = loglog_slope(freqs, spectra)
    stats.setdefault("image_slope", GroupedMoments()).update(slope, keys, skip_nan=True)
    hf = hf_fraction_from_spectrum(freqs, spectra, np.asarray(plan.counts), plan.hf_cutoff)
    stats.setdefault("image_hf_fraction", GroupedMoments()).update(hf, keys, skip_nan=True)
    if Keys.hf_fraction(method) in got:
        stats.setdefault("stored_hf_fraction", GroupedMoments()).update(
            got[Keys.hf_fraction(method)][keep], keys, skip_nan=True)


def aggregate_units(plan: ReadPlan, units: list[int]) -> PartialAggregate:
    """Read ``units`` (done units) of the store and return their partial statistics.

    Reads go block by block (whole units) and overlap with the statistics: while reader threads
    fill block i+1 (file reads and zstd release the GIL), this thread reduces block i."""
    t0 = time.perf_counter()
    root = open_group(plan.store, "r", plan.storage_options)
    arrays: dict[str, Any] = {name: root[name] for name in _arrays_read(plan)}
    per_unit = plan.unit_size * sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in arrays.values())
    # blocks of about read_bytes, never more than a quarter of this task's units (so that reading
    # the next block overlaps with reducing this one for most of the task)
    units_per_read = max(1, min(plan.read_bytes // max(1, per_unit), math.ceil(len(units) / 4)))
    blocks = _blocks(sorted(units), units_per_read)
    threads = max(1, int(plan.threads))
    reader = _BlockReader(plan, arrays, units_per_read, threads, fast=plan.fast_reads)
    part = PartialAggregate(stats={m: {} for m in plan.methods})
    # methods are independent states: with threads, each block's methods are reduced side by side
    reducers = ThreadPoolExecutor(max_workers=min(threads, len(plan.methods)), thread_name_prefix="reduce") \
        if threads > 1 and len(plan.methods) > 1 else None
    # the products here are tiny: a multi-threaded BLAS only spins its threads and takes the
    # cores from the reader and reducer threads (measured: 1.5x slower on 2 cores)
    blas_limit = threadpool_limits(limits=1, user_api="blas")
    try:
        pending = reader.submit(blocks[0], 0) if blocks else None
        for i in range(len(blocks)):
            u0, u1 = blocks[i]
            got = {}
            for name, f in pending.items():
                try:
                    got[name] = f.result()
                except Exception as exc:  # a checksum or codec error: a damaged shard
                    raise StoreError(_damaged_message(plan.store, {u: f"{name}: unreadable ({type(exc).__name__}: "
                                                                      f"{exc})"[:300] for u in range(u0, u1 + 1)},
                                                      units_word="among units")) from None
            pending = reader.submit(blocks[i + 1], (i + 1) % 2) if i + 1 < len(blocks) else None
            part.bytes_read += sum(v.nbytes for v in got.values())
            part.units += u1 - u0 + 1
            keep = np.flatnonzero(np.asarray(got["ok"], dtype=bool))
            part.images += keep.size
            if keep.size == 0:
                continue
            keys = np.asarray(got["target"])[keep]
            if reducers is None:
                for m in plan.methods:
                    _reduce_method(plan, part.stats[m], m, got, keep, keys)
            else:  # every method done before the next block's buffers are reused
                for f in [reducers.submit(_reduce_method, plan, part.stats[m], m, got, keep, keys)
                          for m in plan.methods]:
                    f.result()
    finally:  # waits for reads in flight: no thread writes a buffer after this returns
        reader.close()
        blas_limit.restore_original_limits()
        if reducers is not None:
            reducers.shutdown(wait=True)
    part.seconds = time.perf_counter() - t0
    return part


def _reader_note(store: str, plan: ReadPlan) -> str:
    """Which reader the tasks use, and why (the fast one needs local files in our layout)."""
    if not plan.fast_reads:
        return "zarr (fast reads switched off)"
    if is_remote(store):
        return "zarr (the store is on object storage; the fast shard reader reads local files only)"
    return "fast (whole local shards, decompressed into reused buffers)"


def _arrays_read(plan: ReadPlan) -> list[str]:
    """Every array the job reads, in one place for the readers and the integrity checks."""
    names = ["ok", "target"]
    for m in plan.methods:
        if plan.read_maps or not plan.have_spectra:
            names.append(Keys.maps(m))
        if plan.have_spectra:
            names.append(Keys.spectra(m))
        if plan.have_stored_hf:
            names.append(Keys.hf_fraction(m))
    return names


def _damaged_message(store: str, bad: dict[int, str], units_word: str = "unit(s)") -> str:
    first = "; ".join(f"unit {u}: {why}" for u, why in list(bad.items())[:3])
    return (f"{len(bad)} {units_word} marked done in {store!r} have missing or damaged data ({first}"
            f"{'; ...' if len(bad) > 3 else ''}); no aggregate was written. Run `distributed-attr inspect --verify "
            f"{store}` to mark them not done, then `distributed-attr run CONFIG --resume` to recompute them.")


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


def _make_plan(store: str, root: zarr.Group, read_maps: bool) -> ReadPlan:
    from ..spectral import radial_bin_counts, radial_frequencies

    attrs = dict(root.attrs)
    missing = [k for k in ("unit_size", "n_images", "methods", "image_shape") if k not in attrs]
    if missing:
        raise ValueError(f"{store!r} is not an attribution store: root attributes {missing} are missing")
    methods = list(attrs["methods"])
    _, h, w = (int(v) for v in attrs["image_shape"])
    config = attrs.get("config") or {}
    spectra_cfg = config.get("spectra") or {}
    filters_cfg = config.get("filters") or {}
    have_spectra = all(Keys.spectra(m) in root for m in methods) and Keys.SPECTRA_CUTOFF in root
    if have_spectra:
        cutoffs = [float(c) for c in root[Keys.SPECTRA_CUTOFF][:]]
        frequencies = [float(f) for f in root[Keys.FREQUENCY][:]]
    else:
        from ..spectral import scaled_cutoffs

        image_size = int((config.get("data") or {}).get("image_size") or min(h, w))
        sweep = filters_cfg.get("sweep") or []
        cutoffs = [math.inf] + scaled_cutoffs(sweep, image_size, int(filters_cfg.get("reference_size", 224)))
        frequencies = radial_frequencies(h, w).tolist()
    expected = radial_frequencies(h, w)
    if len(frequencies) == expected.size and np.allclose(frequencies, expected):
        counts = radial_bin_counts(h, w).tolist()
    else:  # another binning than ours: weight bins alike rather than guess
        counts = [1.0] * len(frequencies)
    have_hf = all(Keys.hf_fraction(m) in root for m in methods)
    return ReadPlan(
        store=str(store),
        unit_size=int(attrs["unit_size"]),
        n_images=int(attrs["n_images"]),
        methods=methods,
        image_shape=(int(attrs["image_shape"][0]), h, w),
        have_spectra=have_spectra,
        have_stored_hf=have_hf,
        hf_cutoff=float(spectra_cfg.get("hf_cutoff", DEFAULT_HF_CUTOFF)),
        cutoffs=cutoffs,
        frequencies=frequencies,
        counts=counts,
        filter_kind=str(filters_cfg.get("kind", "forgrad")),
        filter_order=int(filters_cfg.get("order", 2)),
        read_maps=read_maps,
    )


def _count_classes(handle: AttributionStore, usable: np.ndarray) -> int:
    """Distinct ``target`` classes of the usable images (8 bytes per image read)."""
    return int(np.unique(np.asarray(handle.group["target"][:])[usable]).size)


def _local_cpus(num_workers: int | None, threads: int = 1) -> int:
    """CPUs for a local Ray started by the job: this machine's, or more when ``num_workers`` tasks
    of ``threads`` CPUs were asked for, so that they run side by side as asked (oversubscribing
    the cores)."""
    return max(os.cpu_count() or 1, (num_workers or 0) * threads)


_REMOTE_TASK: Any = None


def _run_tasks(plan: ReadPlan, groups: list[list[int]], num_workers: int) -> PartialAggregate:
    """At most ``num_workers`` reader tasks in flight; states merged in completion order."""
    import ray

    global _REMOTE_TASK
    if _REMOTE_TASK is None:  # exported to the cluster once per driver process, not per job
        _REMOTE_TASK = ray.remote(num_cpus=1, max_retries=2)(aggregate_units)
    task = _REMOTE_TASK
    plan_ref = ray.put(plan)
    total = PartialAggregate()
    pending = list(groups)
    in_flight: list[Any] = []
    # a task asks for as many CPUs as it runs threads, so the scheduler does not oversubscribe
    task = task.options(num_cpus=max(1, plan.threads))
    while pending or in_flight:
        while pending and len(in_flight) < num_workers:
            in_flight.append(task.remote(plan_ref, pending.pop(0)))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        total.merge(ray.get(ready[0]))
    return total


def _aggregate_on_ray(plan: ReadPlan, done: np.ndarray, num_workers: int | None,
                      units_per_task: int) -> tuple[int, PartialAggregate]:
    """Reader tasks over the done units on the Ray cluster this process is connected to."""
    import ray

    # a task must fit on a node; with no CPU node up yet (an autoscaling cluster whose head
    # has CPU: 0) the request stands and the autoscaler brings nodes
    largest = int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))
    if largest >= 1:
        plan.threads = min(plan.threads, largest)
    n_tasks = math.ceil(len(done) / max(1, units_per_task))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if num_workers:
        workers = int(num_workers)
    elif cpus >= plan.threads:
        workers = cpus // plan.threads
    else:  # no CPUs yet: put every task up, so that the autoscaler sees the whole demand
        workers = max(1, n_tasks)
    groups = plan_groups(done, max(workers, n_tasks))
    return workers, (_run_tasks(plan, groups, workers) if groups else PartialAggregate())


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
    classes (counted by the driver from ``target``), else the overall mean/std map only."""
    t_start = time.perf_counter()
    store = str(store)
    handle = AttributionStore.open(store, mode="r")
    root = handle.group
    plan = _make_plan(store, root, read_maps)
    plan.threads = THREADS if threads is None else int(threads)
    if plan.threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    done = handle.done_units()
    # A missing shard reads as fill values (NaN maps, ok=False): refuse before averaging over it.
    # Damaged shards fail their checksum or codec while being read (below).
    missing = handle.verify(decode=False, arrays=_arrays_read(plan))
    if missing:
        raise StoreError(_damaged_message(store, missing))
    usable = handle.usable()
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

        with ray_session(address, num_cpus=_local_cpus(num_workers, plan.threads),
                         object_store_memory=100 * 1024 * 1024):
            workers, partial = _aggregate_on_ray(plan, done, num_workers, units_per_task)
    read_seconds = time.perf_counter() - t_read
    _check_counts(store, plan, partial, expected_images)

    results = _finalise(plan, partial)
    out = Path(out_dir) if out_dir else _default_out_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    t_write = time.perf_counter()
    _write_store(store, plan, results, done)
    tables = _write_tables(out, plan, results)
    figures = _plot(out, plan, results) if plots and results else []
    write_seconds = time.perf_counter() - t_write
    headline = {
        m: {
            "n_images": int(r["all"]["n"]),
            "slope_unfiltered": _round(r["all"]["slope"][0]),
            "hf_fraction_unfiltered": _round(r["all"]["hf_fraction"][0]),
        }
        for m, r in results.items()
    }
    return {
        "store": store,
        "out_dir": str(out),
        "workers": workers,
        "threads_per_worker": plan.threads,
        "class_maps": bool(plan.read_maps and plan.class_maps),
        "units": int(partial.units),
        "images": int(partial.images),
        "methods": plan.methods,
        "hf_cutoff": plan.hf_cutoff,
        "spectra_source": "store" if plan.have_spectra else "computed from maps",
        "shard_reader": _reader_note(store, plan),
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


def _scope_results(plan: ReadPlan, states: dict[str, Moments]) -> dict[str, Any]:
    """Everything derived for one scope (all images, or one class) of one method."""
    freqs = np.asarray(plan.frequencies)
    spec: MomentsResult = states["spectrum"].compute()
    slope, intercept = loglog_slope(freqs, spec.mean)
    out = {
        "n": int(spec.count.max()) if spec.count.size else 0,
        "spectrum": spec,
        "slope": slope,
        "intercept": intercept,
        "hf_fraction": hf_fraction_from_spectrum(freqs, spec.mean, np.asarray(plan.counts), plan.hf_cutoff),
    }
    for q in ("image_slope", "image_hf_fraction", "stored_hf_fraction", "map"):
        if q in states:
            out[q] = states[q].compute()
    return out


def _finalise(plan: ReadPlan, partial: PartialAggregate) -> dict[str, dict[Any, dict[str, Any]]]:
    results: dict[str, dict[Any, dict[str, Any]]] = {}
    for m in plan.methods:
        per_q = partial.stats.get(m) or {}
        if "spectrum" not in per_q:
            continue
        scopes: dict[Any, dict[str, Any]] = {"all": _scope_results(plan, {q: g.total() for q, g in per_q.items()})}
        groups = {q: g.groups for q, g in per_q.items()}  # built once: a property that copies
        for cls in per_q["spectrum"].keys():
            scopes[int(cls)] = _scope_results(plan, {q: gq[cls] for q, gq in groups.items() if cls in gq})
        results[m] = scopes
    return results


def _write_store(store: str, plan: ReadPlan, results: dict, done: np.ndarray) -> None:
    """The ``aggregates/`` group, rewritten as a whole by the driver (the single writer)."""
    root = open_group(store, "r+", plan.storage_options)
    agg = root.create_group("aggregates", overwrite=True)
    cutoffs = np.asarray(plan.cutoffs, dtype=np.float64)
    freqs = np.asarray(plan.frequencies, dtype=np.float64)
    agg.create_array("cutoff", data=cutoffs, dimension_names=["cutoff"],
                     attributes={"units": "cycles per image; inf = unfiltered"})
    agg.create_array("frequency", data=freqs, dimension_names=["frequency"], attributes={"units": "cycles per pixel"})

    def put(group, name, data, dims, **attrs):
        group.create_array(name, data=np.asarray(data), dimension_names=list(dims), attributes=attrs)

    for m, scopes in results.items():
        g = agg.create_group(m)
        classes = sorted(k for k in scopes if k != "all")
        put(g, "class", np.asarray(classes, dtype=np.int64), ["class"], meaning="target class the maps explain")
        for prefix, keys, lead in (("", ["all"], []), ("class_", classes, ["class"])):
            def stack(fn, dtype=np.float64):
                arr = np.stack([np.asarray(fn(scopes[k]), dtype=dtype) for k in keys]) if keys else None
                return arr if prefix else (arr[0] if arr is not None else None)

            if not keys:
                continue
            put(g, f"{prefix}n_images", stack(lambda s: s["n"], np.int64), lead)
            put(g, f"{prefix}spectrum_mean", stack(lambda s: s["spectrum"].mean), lead + ["cutoff", "frequency"])
            put(g, f"{prefix}spectrum_std", stack(lambda s: s["spectrum"].std), lead + ["cutoff", "frequency"])
            put(g, f"{prefix}spectrum_ci95", stack(lambda s: s["spectrum"].ci95), lead + ["cutoff", "frequency"],
                meaning="half-width of the normal 95% CI of the mean: 1.96 std / sqrt(n)")
            put(g, f"{prefix}slope", stack(lambda s: s["slope"]), lead + ["cutoff"],
                meaning="log-log slope of the mean spectrum (frequency > 0)")
            put(g, f"{prefix}hf_fraction", stack(lambda s: s["hf_fraction"]), lead + ["cutoff"],
                meaning=f"non-DC energy above {plan.hf_cutoff} cycles/pixel in the mean spectrum")
            for q in ("image_slope", "image_hf_fraction", "stored_hf_fraction"):
                if all(q in scopes[k] for k in keys):
                    for stat in ("mean", "std", "ci95"):
                        put(g, f"{prefix}{q}_{stat}", stack(lambda s: getattr(s[q], stat)), lead + ["cutoff"])
            if all("map" in scopes[k] for k in keys):
                put(g, f"{prefix}map_mean", stack(lambda s: s["map"].mean, np.float32), lead + ["y", "x"])
                put(g, f"{prefix}map_std", stack(lambda s: s["map"].std, np.float32), lead + ["y", "x"])
    agg.attrs.update(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        units_aggregated=int(done.size),
        hf_cutoff=plan.hf_cutoff,
        methods=list(results),
        spectra_source="store" if plan.have_spectra else "computed from maps",
    )


def _write_tables(out: Path, plan: ReadPlan, results: dict) -> dict[str, str]:
    """``spectra.parquet`` (a row per method, scope, cutoff and frequency) and ``summary.parquet``
    (a row per method, scope and cutoff), built column-wise: with 1,000 classes that is ~0.7 M
    spectrum rows, which row-by-row Python would take seconds to assemble."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_size = min(plan.image_shape[1:])
    cutoffs = np.asarray(plan.cutoffs, dtype=np.float64)
    freqs = np.asarray(plan.frequencies, dtype=np.float64)
    n_cut, n_freq = cutoffs.size, freqs.size
    sigma224 = cutoffs * 224 / image_size
    extra = [(q, stat) for q in ("image_slope", "image_hf_fraction", "stored_hf_fraction")
             for stat in ("mean", "std", "ci95")]
    spectra_cols: dict[str, list] = {}
    summary_cols: dict[str, list] = {}

    def add(cols: dict, name: str, values, mask=None) -> None:
        cols.setdefault(name, []).append((np.asarray(values), mask))

    for m, scopes in results.items():
        for key, s in scopes.items():
            scope, cls = ("all", None) if key == "all" else ("class", int(key))
            spec = s["spectrum"]
            rows = n_cut * n_freq
            for cols, k in ((spectra_cols, rows), (summary_cols, n_cut)):
                add(cols, "method", np.full(k, m, dtype=object))
                add(cols, "scope", np.full(k, scope, dtype=object))
                add(cols, "class", np.full(k, -1 if cls is None else cls, dtype=np.int64),
                    np.full(k, cls is None))
            add(spectra_cols, "cutoff", np.repeat(cutoffs, n_freq))
            add(spectra_cols, "sigma_at_224", np.repeat(sigma224, n_freq))
            add(spectra_cols, "frequency", np.tile(freqs, n_cut))
            mean, ci = spec.mean.ravel(), spec.ci95.ravel()
            add(spectra_cols, "mean", mean)
            add(spectra_cols, "std", spec.std.ravel())
            add(spectra_cols, "ci95", ci)
            add(spectra_cols, "lower", mean - ci)
            add(spectra_cols, "upper", mean + ci)
            add(spectra_cols, "n", spec.count.ravel().astype(np.int64))
            add(summary_cols, "cutoff", cutoffs)
            add(summary_cols, "sigma_at_224", sigma224)
            add(summary_cols, "n", np.full(n_cut, int(s["n"]), dtype=np.int64))
            for col in ("slope", "intercept", "hf_fraction"):
                add(summary_cols, col, np.asarray(s[col], dtype=np.float64))
            for q, stat in extra:
                present = q in s
                add(summary_cols, f"{q}_{stat}",
                    np.asarray(getattr(s[q], stat), dtype=np.float64) if present else np.full(n_cut, np.nan),
                    None if present else np.ones(n_cut, dtype=bool))

    def table(cols: dict) -> "pa.Table":
        arrays = {}
        for name, parts in cols.items():
            values = np.concatenate([v for v, _ in parts])
            masks = [mk if mk is not None else np.zeros(len(v), dtype=bool) for v, mk in parts]
            mask = np.concatenate(masks) if any(mk is not None for _, mk in parts) else None
            arrays[name] = pa.array(values, mask=mask) if mask is not None else pa.array(values)
        return pa.table(arrays)

    paths = {"spectra": str(out / "spectra.parquet"), "summary": str(out / "summary.parquet")}
    pq.write_table(table(spectra_cols), paths["spectra"])
    pq.write_table(table(summary_cols), paths["summary"])
    return paths


def _positive_band(mean: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % band clipped to positive values for log axes."""
    floor = np.nanmin(np.where(mean > 0, mean, np.inf)) * 1e-3 if np.any(mean > 0) else 1e-12
    return np.maximum(mean - ci, floor), mean + ci


def _plot(out: Path, plan: ReadPlan, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    freqs = np.asarray(plan.frequencies)
    pos = freqs > 0
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    # tab10 repeats after ten methods: tab20 plus line styles keeps 13+ methods apart
    palette = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    for i, (m, scopes) in enumerate(results.items()):
        s = scopes["all"]
        mean, ci = s["spectrum"].mean[0], s["spectrum"].ci95[0]
        lo, hi = _positive_band(mean[pos], ci[pos])
        line, = ax.loglog(freqs[pos], mean[pos], color=palette[(2 * i) % 20 + (i // 10) % 2],
                          linestyle=styles[(i // 20) % 4], label=f"{m} (slope {s['slope'][0]:.2f}, n={s['n']})")
        ax.fill_between(freqs[pos], lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(plan.hf_cutoff, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("spatial frequency (cycles per pixel)")
    ax.set_ylabel("power |F|² / (H W)")
    ax.set_title("Mean radial power spectrum of the maps (95% CI band)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside, not over, the curves
    paths.append(str(out / "spectra.png"))
    fig.savefig(paths[-1], dpi=130, bbox_inches="tight")
    plt.close(fig)

    methods = list(results)
    panels = len(methods) + 1  # one per method, then the high-frequency fraction against sigma
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    image_size = min(plan.image_shape[1:])
    finite = [k for k, c in enumerate(plan.cutoffs) if not math.isinf(c)]
    for ax, m in zip(axes.ravel(), methods):
        s = results[m]["all"]
        top = np.nanmax(s["spectrum"].mean[:, pos]) if np.any(pos) else 1.0
        for k, c in enumerate(plan.cutoffs):
            mean = s["spectrum"].mean[k]
            label = "unfiltered" if math.isinf(c) else f"σ={c:.3g} (≙{c * 224 / image_size:.0f} @224)"
            color = "black" if math.isinf(c) else cmap(k / max(1, len(plan.cutoffs) - 1))
            ok = pos & (mean > 0)
            ax.loglog(freqs[ok], mean[ok], color=color, linewidth=1.4 if math.isinf(c) else 1.0, label=label)
        if np.isfinite(top) and top > 0:
            ax.set_ylim(top * 1e-7, top * 3)  # filtered-out bins sit at rounding level: not informative
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("cycles per pixel")
        ax.set_ylabel("power")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.ravel()[0].legend(fontsize=6)
    ax = axes.ravel()[len(methods)]
    for m in methods:
        s = results[m]["all"]
        sig = np.asarray([plan.cutoffs[k] * 224 / image_size for k in finite])
        ax.semilogx(sig, s["hf_fraction"][finite], marker="o", markersize=3, label=m)
        ax.axhline(s["hf_fraction"][0], linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("σ at 224 px (cycles per image)")
    ax.set_ylabel(f"energy share above {plan.hf_cutoff} c/px")
    ax.set_title("high-frequency fraction (dotted: unfiltered)", fontsize=10)
    ax.legend(fontsize=6)
    for ax in axes.ravel()[panels:]:
        ax.axis("off")
    fig.suptitle(f"Low-pass filter ({plan.filter_kind}) effect on the mean spectrum")
    fig.tight_layout()
    paths.append(str(out / "filter_effect.png"))
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths
