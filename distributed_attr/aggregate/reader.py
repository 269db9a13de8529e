"""One reader task's work: ``aggregate_units`` reads blocks of whole units with a threaded block
reader and folds them into mergeable states (computing spectra from the maps when the store has
none)."""
from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..io.store import SWAPPED, Keys, StoreError, block_checksum, open_group
from .plan import PartialAggregate, ReadPlan, arrays_read, damaged_shard_message
from .spectra import hf_fraction_from_spectrum, loglog_slope
from .stats import GroupedMoments


def _runs(units: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [first, last] of sorted unit indices."""
    runs: list[tuple[int, int]] = []
    for u in units:
        if runs and u == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], u)
        else:
            runs.append((u, u))
    return runs


def _blocks(units: list[int], units_per_read: int) -> list[tuple[int, int]]:
    """Read calls: runs of contiguous units cut into blocks of at most ``units_per_read``."""
    out = []
    for first, last in _runs(units):
        for u0 in range(first, last + 1, units_per_read):
            out.append((u0, min(last, u0 + units_per_read - 1)))
    return out


class BlockReader:
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


def spectra_from_maps(maps: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """(n, K, F) spectra computed from maps when the store has none (same recipe as the
    workers: unfiltered = the raw map, then the sweep with the config's filter)."""
    import torch

    from ..spectral import spectra_by_cutoff

    x = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    return spectra_by_cutoff(x, plan.cutoffs, kind=plan.filter_kind, order=plan.filter_order)[1].numpy()


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
        spectra = spectra_from_maps(maps, plan).astype(np.float64)
    stats.setdefault("spectrum", GroupedMoments()).update(spectra, keys, skip_nan=True)
    slope, _ = loglog_slope(freqs, spectra)
    stats.setdefault("image_slope", GroupedMoments()).update(slope, keys, skip_nan=True)
    hf = hf_fraction_from_spectrum(freqs, spectra, np.asarray(plan.counts), plan.hf_cutoff)
    stats.setdefault("image_hf_fraction", GroupedMoments()).update(hf, keys, skip_nan=True)
    if Keys.hf_fraction(method) in got:
        stats.setdefault("stored_hf_fraction", GroupedMoments()).update(
            got[Keys.hf_fraction(method)][keep], keys, skip_nan=True)


class RecordedChecksums:
    """(1.3) What the commits recorded of the units a task reads (``units/checksum``), to compare
    each block read with: a shard swapped with another unit's, or replaced, is refused before it
    is averaged. Nothing for a store written before checksums (or a unit without them)."""

    def __init__(self, root: Any, units: list[int]):
        self.first = min(units) if units else 0
        self.columns: dict[str, int] = {}
        self.table = np.empty((0, 0), dtype=np.int64)
        if units and Keys.UNITS_CHECKSUM in root:
            arr = root[Keys.UNITS_CHECKSUM]
            self.columns = {str(n): i for i, n in enumerate(arr.attrs.get("arrays", []))}
            self.table = np.asarray(arr[self.first:max(units) + 1])

    def check(self, plan: ReadPlan, got: dict[str, np.ndarray], block: tuple[int, int]) -> None:
        """Raise ``StoreError`` naming the units and arrays of ``block`` (first and last unit, read
        into ``got``) whose content is not what their commit recorded."""
        if not self.columns:
            return
        start = block[0] * plan.unit_size
        wrong: dict[int, list[str]] = {}
        for name, values in got.items():
            col = self.columns.get(name)
            if col is None:
                continue
            for u in range(block[0], block[1] + 1):
                want = self.table[u - self.first, col]
                a, b = u * plan.unit_size - start, min(plan.n_images, (u + 1) * plan.unit_size) - start
                if want >= 0 and block_checksum(values[a:b]) != want:
                    wrong.setdefault(u, []).append(name)
        if wrong:
            raise StoreError(damaged_shard_message(
                plan.store, {u: f"{', '.join(names)}: content does not match the unit's checksum {SWAPPED}"
                             for u, names in sorted(wrong.items())}))


def aggregate_units(plan: ReadPlan, units: list[int]) -> PartialAggregate:
    """Read ``units`` (done units) of the store and return their partial statistics.

    Reads go block by block (whole units) and overlap with the statistics: while reader threads
    fill block i+1 (file reads and zstd release the GIL), this thread reduces block i."""
    t0 = time.perf_counter()
    root = open_group(plan.store, "r", plan.storage_options)
    arrays: dict[str, Any] = {name: root[name] for name in arrays_read(plan)}
    recorded = RecordedChecksums(root, units)
    per_unit = plan.unit_size * sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in arrays.values())
    # blocks of about read_bytes, never more than a quarter of this task's units (so that reading
    # the next block overlaps with reducing this one for most of the task)
    units_per_read = max(1, min(plan.read_bytes // max(1, per_unit), math.ceil(len(units) / 4)))
    blocks = _blocks(sorted(units), units_per_read)
    threads = max(1, int(plan.threads))
    reader = BlockReader(plan, arrays, units_per_read, threads, fast=plan.fast_reads)
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
                    raise StoreError(damaged_shard_message(plan.store, {u: f"{name}: unreadable ({type(exc).__name__}: "
                                                                      f"{exc})"[:300] for u in range(u0, u1 + 1)},
                                                      units_word="among units")) from None
            pending = reader.submit(blocks[i + 1], (i + 1) % 2) if i + 1 < len(blocks) else None
            recorded.check(plan, got, blocks[i])  # while the next block is read (into the other buffers)
            part.bytes_read += sum(v.nbytes for v in got.values())
            part.units += u1 - u0 + 1
            keep = np.flatnonzero(np.asarray(got[Keys.OK], dtype=bool))
            part.images += keep.size
            if keep.size == 0:
                continue
            keys = np.asarray(got[Keys.TARGET])[keep]
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
