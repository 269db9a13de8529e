"""The attribution store: a Zarr v3 group with one shard per work unit.

Layout (``docs/store.md`` is the public, versioned schema):

    <store>/                      attrs: schema_version, config, config_hash, model_fingerprint, ...
      image, label, target,       (image,)  per-image facts; ``image`` is the global index
      prediction, probability, ok
      maps/<method>               (image, y, x)              float16 by default
      filtered_maps/<method>      (image, stored_cutoff, y, x)
      spectra/<method>            (image, cutoff, frequency)  float32; cutoff +inf = unfiltered
      hf_fraction/<method>        (image, cutoff)
      metrics/<metric>/<output>/<method>   (image, cutoff, *trailing)
      degenerate/<method>         (image,)  uint8 bit flags: all-zero, constant, non-finite map
      source_key                  (image,)  where each image came from (file:row, relative path, tar:key)
      units/done, units/seconds   (unit,)   bookkeeping, written by the driver only
      units/checksum              (unit, array)  (1.3) CRC32C of each unit's block of each per-image array
      lease/                      the driver that holds the store (io/lease.py), while a job runs

Concurrency rules, because Zarr silently loses data when two writers touch one shard:
every array is sharded (or chunked) along ``image`` in blocks of exactly ``unit_size`` images, a
work unit writes each of its arrays in one call covering exactly its block, and only the driver
writes metadata (group attributes, ``units/``). All arrays are created at full size before any
worker starts: resizing rewrites metadata and races.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import zarr

from .lease import LEASE_NAME
from .storage import StorageError, describe_error, is_remote, local_path, object_store, split, zarr_store

#: 1.1 adds ``source_key``, the ``producer`` attribute, and writes every shard of a done unit even
#: when it holds only fill values (so a missing shard always means a lost one). Readers of 1.x
#: read 1.0 stores too. 1.3 adds ``units/checksum`` (the content of each unit's shards, recorded
#: at commit), writes every per-image array of a unit whose images all failed, and adds
#: ``degenerate/<method>`` and the ``resolved`` and ``warnings`` root attributes.
SCHEMA_VERSION = "1.3"
#: the root attribute that marks a Zarr group as one of our stores (written first at creation)
PRODUCER = "distributed_attr"
#: the runtime configuration every writer uses: write a shard even when it holds only fill values
WRITE_CONFIG = {"write_empty_chunks": True}
#: the driver writes its batched commits at most this long after the first of a batch
COMMIT_SECONDS = 1.0
#: how ``units/checksum`` is computed (``block_checksum``), recorded in that array's attributes
CHECKSUM_ALGORITHM = "crc32c"
#: the words of a unit whose content is not what its commit recorded
SWAPPED = "(swapped or replaced shard?)"


class Keys:
    """The one place the store's array paths are spelled (docs/store.md is their public form).
    Writers, readers, the aggregation and the evaluation all build paths here."""

    # -- per-image facts, (image,) each ----------------------------------------------------------
    #: the global index of the image (never holds its fill value: proves a unit's shard exists)
    IMAGE = "image"
    LABEL = "label"
    TARGET = "target"
    PREDICTION = "prediction"
    PROBABILITY = "probability"
    #: false for failed images
    OK = "ok"
    #: (1.1) where each image came from
    SOURCE_KEY = "source_key"
    #: (1.2) each image's ground-truth mask, when the data has one (``data.mask_column``)
    GROUND_TRUTH_MASK = "ground_truth/mask"

    # -- groups and their coordinates -------------------------------------------------------------
    #: the driver's bookkeeping group
    UNITS = "units"
    UNITS_DONE = "units/done"
    UNITS_SECONDS = "units/seconds"
    #: (1.3) (unit, array) int64: CRC32C of each unit's block of each per-image array as written
    #: (``block_checksum``); -1 = not recorded. The array's attribute ``arrays`` names the columns.
    UNITS_CHECKSUM = "units/checksum"
    FREQUENCY = "spectra/frequency"
    SPECTRA_CUTOFF = "spectra/cutoff"
    HF_FRACTION_CUTOFF = "hf_fraction/cutoff"
    METRICS = "metrics"
    METRICS_CUTOFF = "metrics/cutoff"
    STORED_CUTOFF = "filtered_maps/stored_cutoff"
    #: the aggregation job's output group, rewritten as a whole by its driver (``aggregate/outputs.py``
    #: writes the per-method statistics inside ``aggregates/<method>``; docs/spectra.md lists them)
    AGGREGATES = "aggregates"
    AGGREGATES_CUTOFF = "aggregates/cutoff"
    AGGREGATES_FREQUENCY = "aggregates/frequency"

    @staticmethod
    def maps(method: str) -> str:
        return f"maps/{method}"

    @staticmethod
    def filtered_maps(method: str) -> str:
        return f"filtered_maps/{method}"

    @staticmethod
    def spectra(method: str) -> str:
        return f"spectra/{method}"

    @staticmethod
    def hf_fraction(method: str) -> str:
        return f"hf_fraction/{method}"

    @staticmethod
    def metric_group(metric: str) -> str:
        return f"metrics/{metric}"

    @staticmethod
    def aggregates(method: str) -> str:
        return f"aggregates/{method}"

    @staticmethod
    def metric(metric: str, output: str, method: str) -> str:
        return f"metrics/{metric}/{output}/{method}"

    #: (1.3) per method, each raw map's degenerate-map bit flags (``methods.degenerate``)
    DEGENERATE = "degenerate"

    @staticmethod
    def degenerate(method: str) -> str:
        return f"degenerate/{method}"


class StoreError(RuntimeError):
    """The store cannot be used as asked (exists with another config, unreadable, ...)."""


@dataclass
class ArraySpec:
    path: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]  # full shape, image axis first
    dtype: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StorePlan:
    """Everything needed to create a store before any work starts."""

    n_images: int
    unit_size: int
    image_shape: tuple[int, int, int]
    methods: list[str]
    map_dtype: str = "float16"
    frequencies: list[float] | None = None  # None: no spectra
    cutoffs: list[float] = field(default_factory=lambda: [math.inf])
    stored_cutoffs: list[float] = field(default_factory=list)
    #: metric -> output -> (trailing dims, trailing sizes, coords for trailing dims)
    metric_outputs: dict[str, dict[str, tuple[tuple[str, ...], tuple[int, ...], dict[str, list]]]] = field(
        default_factory=dict
    )
    attrs: dict[str, Any] = field(default_factory=dict)
    #: whether the data carry ground-truth masks (stored at input resolution, ``Keys.GROUND_TRUTH_MASK``)
    ground_truth_mask: bool = False

    @property
    def n_units(self) -> int:
        return (self.n_images + self.unit_size - 1) // self.unit_size

    def checksummed_arrays(self) -> list[str]:
        """The columns of ``units/checksum``: every per-image array, in sorted path order."""
        return sorted(spec.path for spec in self.arrays())

    def arrays(self) -> list[ArraySpec]:
        n, (_, h, w) = self.n_images, self.image_shape
        specs = [
            ArraySpec(Keys.IMAGE, ("image",), (n,), "int64"),
            ArraySpec(Keys.LABEL, ("image",), (n,), "int64"),
            ArraySpec(Keys.TARGET, ("image",), (n,), "int64"),
            ArraySpec(Keys.PREDICTION, ("image",), (n,), "int64"),
            ArraySpec(Keys.PROBABILITY, ("image",), (n,), "float32"),
            ArraySpec(Keys.OK, ("image",), (n,), "bool"),
            ArraySpec(Keys.SOURCE_KEY, ("image",), (n,), "str"),
        ]
        if self.ground_truth_mask:
            specs.append(ArraySpec(Keys.GROUND_TRUTH_MASK, ("image", "y", "x"), (n, h, w), "bool"))
        k = len(self.cutoffs)
        for m in self.methods:
            specs.append(ArraySpec(Keys.maps(m), ("image", "y", "x"), (n, h, w), self.map_dtype))
            if self.stored_cutoffs:
                specs.append(ArraySpec(Keys.filtered_maps(m), ("image", "stored_cutoff", "y", "x"),
                                       (n, len(self.stored_cutoffs), h, w), self.map_dtype))
            if self.frequencies is not None:
                specs.append(ArraySpec(Keys.spectra(m), ("image", "cutoff", "frequency"),
                                       (n, k, len(self.frequencies)), "float32"))
                specs.append(ArraySpec(Keys.hf_fraction(m), ("image", "cutoff"), (n, k), "float32"))
            for metric, outputs in self.metric_outputs.items():
                for out, (dims, sizes, coords) in outputs.items():
                    specs.append(ArraySpec(Keys.metric(metric, out, m), ("image", "cutoff", *dims),
                                           (n, k, *sizes), "float32", {"coords": coords}))
        specs += [ArraySpec(Keys.degenerate(m), ("image",), (n,), "uint8", {"flags": _degenerate_flags()})
                  for m in self.methods]
        return specs


def _degenerate_flags() -> dict[str, int]:
    """The bits of ``degenerate/<method>`` by name, recorded in each array's ``flags`` attribute
    (readers take them from there). Imported when a store is created (the driver has the methods
    loaded by then)."""
    from ..methods.degenerate import FLAGS

    return dict(FLAGS)


def inner_chunk(unit_size: int, bytes_per_image: int, target: int = 1 << 18) -> int:
    """Largest divisor of ``unit_size`` whose chunk stays under ``target`` bytes (>= 1)."""
    best = 1
    for c in range(1, unit_size + 1):
        if unit_size % c == 0 and c * bytes_per_image <= target:
            best = c
    return best


def block_checksum(block: np.ndarray) -> int:
    """CRC32C of one unit's block of an array, as stored (after the cast to the array's dtype):
    numbers and flags over their little-endian bytes in C order; strings over each value's UTF-8
    bytes, each preceded by its length (4 bytes, little-endian). The worker computes it over what
    it writes, ``verify`` and the aggregation's readers over what they read back."""
    import google_crc32c

    if block.dtype.kind in "UOT":
        parts = []
        for value in block.ravel().tolist():
            data = str(value).encode("utf-8")
            parts += [len(data).to_bytes(4, "little"), data]
        return int(google_crc32c.value(b"".join(parts)))
    return int(google_crc32c.value(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))))


def _fill(dtype: str) -> Any:
    if dtype == "str":
        return ""
    if dtype.startswith("float"):
        return float("nan")
    if dtype == "bool":
        return False
    if dtype.startswith("uint"):
        return 0  # bit flags (``degenerate/<method>``): no bit set
    return -1


class AttributionStore:
    """Driver-side handle: create, resume, record progress. Workers use ``UnitWriter``."""

    def __init__(self, path: str | Path, group: zarr.Group, storage_options: dict[str, Any] | None = None):
        self.path = str(path)
        self.group = group
        self.storage_options = storage_options
        self._arrays: dict[str, Any] = {}
        self._pending: dict[int, float] = {}  # unit -> seconds, committed but not yet written
        self._pending_checksums: dict[int, dict[str, int]] = {}  # unit -> {array: CRC32C}, likewise
        self._has_checksums: bool | None = None  # whether the store has ``units/checksum`` (1.3)
        self._pending_failures: dict[str, str] = {}
        self._pending_since = 0.0
        #: a reader's snapshot of ``units/done`` (bool per unit): when set, ``done_units`` and
        #: ``usable`` answer from it, so that a reader of a store a job is writing (``evaluate
        #: --partial``) reads one set of units throughout, the one it records
        self.frozen_done: np.ndarray | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, plan: StorePlan, kept: Iterable[str] = (),
               storage_options: dict[str, Any] | None = None) -> "AttributionStore":
        """Create the store at ``path`` (a folder or an object-store URL), which must be missing or
        empty: a lease may be there, and the entries ``kept`` by ``clear_store``. This never
        deletes anything; ``clear_store`` is the one function that does."""
        path = str(path)
        kind, entries = _listing(path, storage_options)
        if kind not in ("missing", "empty") and not (kind == "foreign" and set(entries) <= {LEASE_NAME, *kept}):
            raise StoreError(f"cannot create a store at {path!r}: it is {KIND_WORDS[kind]}")
        root = zarr.open_group(store=zarr_store(path, storage_options), mode="a", zarr_format=3)
        # Marked as ours before anything else, so an interrupted creation can still be replaced.
        root.attrs.update(producer=PRODUCER, schema_version=SCHEMA_VERSION)
        for spec in plan.arrays():
            itemsize = 16 if spec.dtype == "str" else np.dtype(spec.dtype).itemsize
            per_image = int(np.prod(spec.shape[1:], dtype=np.int64)) * itemsize
            chunk0 = inner_chunk(plan.unit_size, max(1, per_image))
            shards = None
            if chunk0 < plan.unit_size:
                shards = (plan.unit_size, *spec.shape[1:])
            root.create_array(
                spec.path,
                shape=spec.shape,
                chunks=(chunk0, *spec.shape[1:]),
                shards=shards,
                dtype=str if spec.dtype == "str" else spec.dtype,
                fill_value=_fill(spec.dtype),
                dimension_names=list(spec.dims),
                attributes=spec.attrs,
            )
        # Coordinates inside each group, so xarray.open_zarr(store, group=...) sees them.
        cutoff_paths = [Keys.SPECTRA_CUTOFF, Keys.HF_FRACTION_CUTOFF, Keys.METRICS_CUTOFF] \
            if plan.frequencies is not None else [Keys.METRICS_CUTOFF]
        for cutoff_path in cutoff_paths:
            root.create_array(cutoff_path, data=np.asarray(plan.cutoffs, dtype="float64"),
                              dimension_names=["cutoff"], attributes={"units": "cycles per image; inf = unfiltered"})
        if plan.frequencies is not None:
            root.create_array(Keys.FREQUENCY, data=np.asarray(plan.frequencies, dtype="float64"),
                              dimension_names=["frequency"], attributes={"units": "cycles per pixel"})
        if plan.stored_cutoffs:
            root.create_array(Keys.STORED_CUTOFF, data=np.asarray(plan.stored_cutoffs, dtype="float64"),
                              dimension_names=["stored_cutoff"], attributes={"units": "cycles per image"})
        # Written by the driver alone, in batches: chunks of many units make a batch a write or two.
        unit_chunk = min(max(1, plan.n_units), 4096)
        root.create_array(Keys.UNITS_DONE, shape=(plan.n_units,), chunks=(unit_chunk,), dtype="uint8", fill_value=0,
                          dimension_names=["unit"])
        root.create_array(Keys.UNITS_SECONDS, shape=(plan.n_units,), chunks=(unit_chunk,), dtype="float32",
                          fill_value=float("nan"), dimension_names=["unit"])
        columns = plan.checksummed_arrays()
        root.create_array(Keys.UNITS_CHECKSUM, shape=(plan.n_units, len(columns)),
                          chunks=(unit_chunk, len(columns)), dtype="int64", fill_value=-1,
                          dimension_names=["unit", "array"],
                          attributes={"arrays": columns, "algorithm": CHECKSUM_ALGORITHM})
        attrs = dict(plan.attrs)
        attrs.update(
            schema_version=SCHEMA_VERSION,
            n_images=plan.n_images,
            unit_size=plan.unit_size,
            n_units=plan.n_units,
            image_shape=list(plan.image_shape),
            methods=list(plan.methods),
            metrics=list(plan.metric_outputs),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            failures={},
            # derived results record both, and are out of date when either differs (io/derived.py)
            generation=0,
            store_id=uuid.uuid4().hex,
        )
        # Written last: a store without ``ready`` was interrupted while being created.
        attrs["ready"] = True
        root.attrs.update(attrs)
        return cls(path, root, storage_options)

    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "r+"] = "r+",
             storage_options: dict[str, Any] | None = None) -> "AttributionStore":
        """Open an existing store (a folder or an object-store URL), or raise ``StoreError`` saying
        what is wrong: nothing there, not a store of ours, corrupt metadata, interrupted creation,
        an unreadable schema version, an unreachable bucket."""
        path = str(path)
        kind = classify_path(path, storage_options)
        if kind != "store":
            raise StoreError(f"no attribution store at {path!r}: it is {KIND_WORDS[kind]}")
        try:
            group = zarr.open_group(store=zarr_store(path, storage_options, read_only=mode == "r"), mode=mode,
                                    zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{path!r} is not a readable Zarr v3 store: {exc}") from None
        _check_readable(path, group)
        check_nodes(path, group)
        return cls(path, group, storage_options)

    @classmethod
    def from_group(cls, group: zarr.Group, path: str | Path | None = None,
                   storage_options: dict[str, Any] | None = None) -> "AttributionStore":
        """Wrap a root group someone else opened, with the checks ``open`` makes on what it opens:
        one of our stores (our ``producer``, or a 1.0 store's schema attributes), fully created,
        of a readable schema version; ``StoreError`` otherwise. ``path`` names the store in
        messages (default: the group's folder, where it has one)."""
        if path is None:
            root = getattr(group.store, "root", None)
            path = str(root) if root is not None else str(group.store)
        path = str(path)
        if not _is_ours(dict(group.attrs)):
            raise StoreError(f"no attribution store at {path!r}: it is {KIND_WORDS['foreign']}")
        _check_readable(path, group)
        return cls(path, group, storage_options)

    # -- facts -----------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def unit_size(self) -> int:
        return int(self.group.attrs["unit_size"])

    @property
    def n_units(self) -> int:
        return int(self.group.attrs["n_units"])

    @property
    def n_images(self) -> int:
        return int(self.group.attrs["n_images"])

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_size
        return start, min(self.n_images, start + self.unit_size)

    @property
    def schema_version(self) -> tuple[int, int]:
        return schema_of(self.group.attrs)

    @property
    def generation(self) -> int:
        """The store's generation: 0 at creation, advanced by every ``flush`` that commits units
        and every ``mark_not_done``. A store written before the counter existed reads as 0. As
        read when this handle was opened: readers take it before they read ``units/done``."""
        return int(self.group.attrs.get("generation", 0))

    def done_units(self) -> np.ndarray:
        if self.frozen_done is not None:
            return np.flatnonzero(self.frozen_done)
        self.flush()
        return np.flatnonzero(self.group[Keys.UNITS_DONE][:] == 1)

    def usable(self) -> np.ndarray:
        """Boolean mask over images: ok and in a unit marked done. A unit that was running when
        a job stopped may hold a partial block, and failed images hold fill values."""
        done = (self.frozen_done if self.frozen_done is not None
                else np.asarray(self.group[Keys.UNITS_DONE][:]) == 1)
        in_done = np.repeat(done, self.unit_size)[: self.n_images]
        return in_done & np.asarray(self.group[Keys.OK][:]).astype(bool)

    def per_image_arrays(self) -> list[str]:
        """Paths of every array with one block per unit (first dimension ``image``)."""
        return [name for name, arr in walk_arrays(self.group) if (arr.metadata.dimension_names or ("",))[0] == "image"]

    def verify(self, *, decode: bool = True, arrays: Iterable[str] | None = None,
               units: Iterable[int] | None = None) -> dict[int, str]:
        """Check that every done unit's block of every per-image array (or of ``arrays``) exists
        and, with ``decode``, reads back (checksums, codecs) and is the unit's own: ``image`` holds
        the unit's range of global indices, and (1.3) each block's CRC32C equals the one its
        commit recorded (``units/checksum``), so a shard swapped with another unit's or replaced
        is found. Returns {unit: reason} for the bad ones, reasons naming the array(s). Nothing is
        changed: see ``mark_not_done``."""
        names = list(arrays) if arrays is not None else self.per_image_arrays()
        todo = [int(u) for u in (units if units is not None else self.done_units())]
        bad: dict[int, str] = {}
        if not todo:
            return bad
        # Before 1.1, shards holding only fill values were not written: absence proves nothing
        # except for ``image`` (``Keys.IMAGE``), which never holds its fill value.
        check_presence = self.schema_version >= (1, 1)
        # (1.3) what each unit's commit recorded of its blocks; {} for older stores
        recorded, columns = self.recorded_checksums() if decode else (None, {})
        content: dict[int, list[str]] = {}  # unit -> arrays whose content is not the unit's
        for name in names:
            arr = self.group[name]
            if check_presence or name == Keys.IMAGE:
                present = _stored_chunk_keys(arr)
                # our writers make one shard (or chunk) per unit; arrays written otherwise
                # (by hand, by other tools) are checked chunk by chunk all the same
                rows = (arr.shards or arr.chunks)[0]
                for u in todo:
                    start, stop = self.unit_range(u)
                    for c in range(start // rows, (stop - 1) // rows + 1):
                        key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
                        if key not in present and u not in bad:
                            bad[u] = f"{name}: shard {key} is missing"
            if decode:
                for u in todo:
                    if u in bad:
                        continue
                    start, stop = self.unit_range(u)
                    try:
                        block = arr[start:stop]
                    except Exception as exc:  # a codec or checksum error: the shard is damaged
                        bad[u] = f"{name}: shard for images {start}-{stop - 1} is unreadable ({type(exc).__name__}: {exc})"[:300]
                        continue
                    if name == Keys.IMAGE and not np.array_equal(block, np.arange(start, stop)):
                        # each image's global index: a shard of another unit holds another range
                        held = np.asarray(block)
                        bad[u] = (f"image: holds images {held.min()}-{held.max()}, not this unit's {start}-{stop - 1} "
                                  f"{SWAPPED}")
                        continue
                    col = columns.get(name)
                    if col is not None and recorded[u, col] >= 0 and block_checksum(block) != recorded[u, col]:
                        content.setdefault(u, []).append(name)
        for u, wrong in content.items():
            if u not in bad:
                bad[u] = f"{', '.join(wrong)}: content does not match the unit's checksum {SWAPPED}"
        return dict(sorted(bad.items()))

    def recorded_checksums(self) -> tuple[np.ndarray | None, dict[str, int]]:
        """(1.3) ``units/checksum`` as (table (unit, array) int64, -1 where not recorded; {array
        path: column}); ``(None, {})`` for a store written before checksums were recorded."""
        if Keys.UNITS_CHECKSUM not in self.group:
            return None, {}
        arr = self.group[Keys.UNITS_CHECKSUM]
        return np.asarray(arr[:]), {str(name): i for i, name in enumerate(arr.attrs.get("arrays", []))}

    def require_intact(self, arrays: Iterable[str] | None = None) -> None:
        """Raise ``StoreError`` when any done unit has a missing, unreadable or (1.3) swapped or
        replaced shard (of ``arrays``), so that no aggregate is ever computed over fill values or
        another unit's data."""
        bad = self.verify(decode=True, arrays=arrays)
        if bad:
            raise StoreError(damaged_message(self.path, bad))

    def failures(self) -> dict[int, str]:
        self.flush()
        return {int(k): v for k, v in dict(self.group.attrs.get("failures", {})).items()}

    def degenerate_counts(self) -> dict[str, dict[str, int]]:
        """Per method, over the usable images: ``maps`` (how many), ``degenerate`` (maps with any
        flag) and the count of each flag of ``degenerate/<method>`` by name (``all_zero``,
        ``constant``, ``non_finite``: the array's ``flags`` attribute). Methods of a store made
        before 1.3 (no such array) are left out."""
        self.flush()
        usable = self.usable()
        out: dict[str, dict[str, int]] = {}
        for method in self.group.attrs.get("methods", []):
            try:
                arr = self.group[Keys.degenerate(method)]
            except KeyError:
                continue
            values = np.asarray(arr[:])[usable]
            counts = {"maps": int(usable.sum()), "degenerate": int(np.count_nonzero(values))}
            counts.update({str(name): int(np.count_nonzero(values & int(bit)))
                           for name, bit in dict(arr.attrs.get("flags", {})).items()})
            out[method] = counts
        return out

    # -- driver-only writes ----------------------------------------------------------------------
    def commit_unit(self, unit: int, seconds: float, failures: dict[int, str],
                    checksums: dict[str, int] | None = None) -> None:
        """Record a unit whose data are already durable. Commits are batched: written by
        ``flush``, at most ``COMMIT_SECONDS`` after the first unbatched one (each write is a
        metadata round trip, ~5 ms locally and more on object storage, which one driver feeding
        hundreds of actors cannot pay per unit). A driver killed before a flush loses only the
        done flags: those units are recomputed on resume, and rewrite the same shards.

        ``checksums``: ``{array: CRC32C}`` of the unit's blocks as its worker wrote them
        (``UnitWriter.write``), recorded in ``units/checksum`` (1.3 stores; dropped for older ones).
        A unit that ran twice (an actor lost after writing, a retry) wrote the same bytes both
        times (the results are deterministic), so the checksums of the result that is committed
        are those of the durable write."""
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending[int(unit)] = float(seconds)
        self._pending_checksums[int(unit)] = dict(checksums or {})
        self._pending_failures.update({str(k): v for k, v in failures.items()})
        if time.monotonic() - self._pending_since >= COMMIT_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the batched commits: failures first, then times, the done flags last."""
        if not self._pending:
            return
        if self._pending_failures:
            merged = {str(k): v for k, v in self.group.attrs.get("failures", {}).items()}
            merged.update(self._pending_failures)
            self.group.attrs["failures"] = merged
        units = np.fromiter(sorted(self._pending), dtype=np.int64)
        seconds = np.asarray([self._pending[int(u)] for u in units], dtype=np.float32)
        self._bookkeeping(Keys.UNITS_SECONDS).set_orthogonal_selection((units,), seconds)
        self._flush_checksums(units)
        self._bookkeeping(Keys.UNITS_DONE).set_orthogonal_selection((units,), np.ones(len(units), dtype=np.uint8))
        self._pending.clear()
        self._pending_failures.clear()
        self._pending_checksums.clear()
        self._advance_generation()

    def _flush_checksums(self, units: np.ndarray) -> None:
        """(1.3) The committed units' rows of ``units/checksum``, before their done flags; -1 for an
        array a unit's result did not report."""
        if self._has_checksums is None:  # looked up once
            self._has_checksums = Keys.UNITS_CHECKSUM in self.group
        if not self._has_checksums:
            return  # a store of an older schema: nothing to record them in
        arr = self._bookkeeping(Keys.UNITS_CHECKSUM)
        columns = list(arr.attrs.get("arrays", []))
        rows = np.full((len(units), len(columns)), -1, dtype=np.int64)
        for i, u in enumerate(units.tolist()):
            got = self._pending_checksums.get(int(u), {})
            rows[i] = [got.get(name, -1) for name in columns]
        arr.set_orthogonal_selection((units, slice(None)), rows)

    def _bookkeeping(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:  # looked up once: each lookup reads the array's metadata
            arr = self._arrays[name] = self.group[name]
        return arr

    def mark_not_done(self, reasons: dict[int, str]) -> None:
        """Mark units not done (their data are missing or damaged) and record why; ``--resume``
        recomputes them."""
        self.flush()
        if not reasons:
            return
        done = self.group[Keys.UNITS_DONE]
        for u in reasons:
            done[int(u)] = 0
        if Keys.UNITS_CHECKSUM in self.group:  # (1.3) what was recorded no longer describes the unit
            checksum = self.group[Keys.UNITS_CHECKSUM]
            for u in reasons:
                checksum[int(u)] = -1
        invalid = {str(k): v for k, v in self.group.attrs.get("invalid_units", {}).items()}
        invalid.update({str(u): why for u, why in reasons.items()})
        self.group.attrs["invalid_units"] = invalid
        self._advance_generation()

    def _advance_generation(self) -> None:
        """One step of ``generation``, after the done flags changed (never before: a reader that
        read the generation first and ``units/done`` second then records an older generation than
        the flags it read, and its outputs show as out of date, never as current)."""
        self.group.attrs["generation"] = self.generation + 1

    def set_attrs(self, **attrs: Any) -> None:
        self.flush()
        self.group.attrs.update(attrs)


def _check_readable(path: str, group: zarr.Group) -> None:
    """Raise ``StoreError`` unless the store was fully created and has a schema this version reads."""
    if not group.attrs.get("ready"):
        raise StoreError(f"{path!r} was not fully created (interrupted); rerun its job to replace it")
    version = str(group.attrs.get("schema_version", "?"))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise StoreError(f"{path!r} has schema {version}; this version reads {SCHEMA_VERSION.split('.')[0]}.x")


#: what a store whose nodes are damaged can do
_DAMAGED_HINT = ("the store cannot be read as it is: rerun its job with `--overwrite` (or into a new store) to "
                 "recompute it")


def schema_of(attrs: Any) -> tuple[int, int]:
    """(major, minor) of a store's ``schema_version`` attribute (1.0 when absent)."""
    major, _, minor = str(attrs.get("schema_version", "1.0")).partition(".")
    return int(major), int(minor or 0)


def check_nodes(path: str, group: zarr.Group) -> None:
    """Raise ``StoreError`` (one line, naming the node) when a node of the store cannot be read
    (its ``zarr.json`` truncated or not Zarr metadata), or a node every store has is missing (the
    bookkeeping group ``units``, the per-image facts, a method's maps): what would otherwise end
    in a ``KeyError`` or a JSON error deep in a reader. The lease and the aggregation's output
    group (``aggregates``, rewritten by ``aggregate``) are not looked at. Reads every node's
    metadata once (concurrently; one listing per group)."""
    skip = {LEASE_NAME, Keys.AGGREGATES}
    try:
        names = {name for name, _ in group.members(max_depth=None)}
    except Exception:
        names = None
    if names is None:  # find the node that fails, level by level
        names = set()
        todo: list[tuple[str, zarr.Group]] = [("", group)]
        while todo:
            prefix, g = todo.pop()
            for child in sorted(_child_names(g)):
                if not prefix and child in skip:
                    continue
                try:
                    member = g[child]
                except KeyError:
                    continue  # a folder without zarr.json: not a node (anything a user left there)
                except Exception as exc:
                    raise StoreError(
                        f"{path!r} is damaged: the metadata of {prefix + child!r} cannot be read "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {_DAMAGED_HINT}"
                    ) from None
                names.add(prefix + child)
                if isinstance(member, zarr.Group):
                    todo.append((prefix + child + "/", member))
    attrs = dict(group.attrs)
    required = [Keys.UNITS_DONE, Keys.UNITS_SECONDS, Keys.IMAGE, Keys.OK, Keys.LABEL, Keys.TARGET,
                Keys.PREDICTION, Keys.PROBABILITY, *(Keys.maps(m) for m in attrs.get("methods") or [])]
    if schema_of(attrs) >= (1, 3):
        # without them a 1.3 store would read as an older one: swapped shards unchecked, degenerate
        # maps "not recorded"
        required += [Keys.UNITS_CHECKSUM, *(Keys.degenerate(m) for m in attrs.get("methods") or [])]
    missing = [k for k in required if k not in names]
    if missing:
        raise StoreError(f"{path!r} is damaged: {', '.join(repr(k) for k in missing[:5])}"
                         f"{' and more' if len(missing) > 5 else ''} missing; {_DAMAGED_HINT}")


def _child_names(group: zarr.Group) -> list[str]:
    """The names directly below ``group`` in its store (nodes or not), from one listing."""
    from zarr.core.sync import sync

    store, prefix = group.store_path.store, group.store_path.path.rstrip("/")

    async def collect() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    return [n.rstrip("/") for n in sync(collect()) if n.rstrip("/") != "zarr.json"]


def unfinished_store(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why the store at ``path`` holds no finished unit, so that replacing it loses nothing (its
    creation or its deletion by ``--overwrite`` was interrupted, or its job stopped before the
    first unit was committed), or None: it holds one, once held one (``inspect --verify`` marked
    units not done, or failures were recorded), or this cannot be told (damaged metadata)."""
    try:
        group = zarr.open_group(store=zarr_store(path, storage_options, read_only=True), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
    except Exception:
        return None
    if not _is_ours(attrs):
        return None
    if not attrs.get("ready"):
        return "it was not fully created (or its deletion was interrupted)"
    if attrs.get("invalid_units") or attrs.get("failures"):
        return None
    try:
        if np.asarray(group[Keys.UNITS_DONE][:]).any():
            return None
    except Exception:
        return None
    return "its job stopped before the first unit was finished"


def _is_ours(attrs: dict[str, Any]) -> bool:
    """Whether root attributes mark one of our stores: our ``producer`` (1.1), or the schema keys
    every store has had since 1.0."""
    return attrs.get("producer") == PRODUCER or {"schema_version", "n_units", "unit_size"} <= set(attrs)


def damaged_message(store: str, bad: dict[int, str], units_word: str = "unit(s)", outcome: str = "") -> str:
    """The one message for done units whose data are missing or damaged: which, and what to run."""
    first = "; ".join(f"unit {u}: {why}" for u, why in list(bad.items())[:3])
    return (f"{len(bad)} {units_word} marked done in {store!r} have missing or damaged data ({first}"
            f"{'; ...' if len(bad) > 3 else ''}){outcome}. Run `distributed-attr inspect --verify {store}` to mark "
            "them not done, then `distributed-attr run CONFIG --resume` to recompute them.")


def outputs_dir(store: str | Path) -> Path:
    """Where tables, plots and reports of a store go: ``<parent>/<stem>-outputs`` beside a local
    store; ``./<stem>-outputs`` in the working folder for a store on object storage."""
    if is_remote(str(store)):
        name = str(store).rstrip("/").rsplit("/", 1)[-1]
        return Path.cwd() / f"{Path(name).stem}-outputs"
    p = Path(local_path(str(store))).resolve()
    return p.parent / f"{p.stem}-outputs"


def open_group(store: str, mode: Literal["r", "r+"] = "r", storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """The store's root group for code that has checked it already (``AttributionStore.open``)."""
    return zarr.open_group(store=zarr_store(store, storage_options, read_only=mode == "r"), mode=mode, zarr_format=3)


#: how messages name each kind of location ``classify_path`` tells apart
KIND_WORDS = {
    "missing": "missing",
    "empty": "an empty folder",
    "store": "an attribution store",
    "file": "a file, not a folder",
    "foreign": "a folder that is not an attribution store (no distributed_attr metadata)",
}


def classify_path(path: str | Path, storage_options: dict[str, Any] | None = None
                  ) -> Literal["missing", "empty", "store", "file", "foreign"]:
    """What is at ``path`` (a folder or an object-store URL): nothing, an empty folder (a lease
    alone counts as empty), one of our stores (a Zarr v3 group whose attributes carry our
    ``producer`` or, before 1.1, our schema keys), a file, or anything else ("foreign": never
    written to, never deleted)."""
    return _listing(str(path), storage_options)[0]


def _listing(path: str, storage_options: dict[str, Any] | None) -> tuple[str, list[str]]:
    """(kind, top-level entries) of a location; see ``classify_path``."""
    if is_remote(path):
        entries, meta, is_object = _remote_listing(path, storage_options)
        if is_object:
            return "file", []
    else:
        p = Path(local_path(path))
        if not p.exists():
            return "missing", []
        if not p.is_dir():
            return "file", []
        entries = os.listdir(p)
        try:
            meta = (p / "zarr.json").read_bytes()
        except FileNotFoundError:
            meta = None
        except OSError:
            meta = b""
    others = [e for e in entries if e != LEASE_NAME]
    if not others:
        return ("empty" if entries or not is_remote(path) else "missing"), entries
    if meta is None:
        return "foreign", entries
    try:
        raw = json.loads(meta)
    except ValueError:
        # Unparseable metadata: ours only if the folder has our layout (a damaged store stays
        # replaceable); otherwise someone else's.
        return ("store" if {Keys.UNITS, Keys.OK, Keys.IMAGE} <= set(entries) else "foreign"), entries
    attrs = (raw.get("attributes") or {}) if isinstance(raw, dict) else {}
    if isinstance(raw, dict) and raw.get("zarr_format") == 3 and raw.get("node_type") == "group" and (
            _is_ours(attrs)):
        return "store", entries
    return "foreign", entries


def _remote_listing(url: str, storage_options: dict[str, Any] | None) -> tuple[list[str], bytes | None, bool]:
    """(top-level entries, root zarr.json or None, whether the URL names an object itself)."""
    import obstore

    try:
        store = object_store(url, storage_options)
        listed = obstore.list_with_delimiter(store)
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"]]
        entries += [o["path"].rsplit("/", 1)[-1] for o in listed["objects"]]
        meta = bytes(obstore.get(store, "zarr.json").bytes()) if "zarr.json" in entries else None
        is_object = False
        if not entries:
            bucket, key = split(url)
            if key:
                try:
                    obstore.head(object_store(bucket, storage_options), key)
                    is_object = True
                except FileNotFoundError:
                    pass
        return entries, meta, is_object
    except StorageError as exc:
        raise StoreError(str(exc)) from None
    except Exception as exc:
        raise StoreError(f"cannot reach the store at {describe_error(exc, url)}") from None


def clear_store(path: str | Path, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete one of our stores' contents (its metadata and its Zarr nodes), keeping the lease and
    anything that is not part of the store; returns the names kept. Refuses anything that
    ``classify_path`` does not call a store."""
    path = str(path)
    kind, entries = _listing(path, storage_options)
    if kind not in ("store", "empty"):
        raise StoreError(f"refusing to delete {path!r}: it is not an attribution store")
    if is_remote(path):
        return _clear_remote(path, entries, storage_options)
    root = Path(local_path(path))
    # First the root is marked not fully created, so that a deletion stopped half-way (an error, a
    # kill) leaves a store every reader refuses and any rerun replaces, never one still "ready".
    if "zarr.json" in entries:
        _write_atomically(root / "zarr.json", _incomplete_root(_read_or_none(root / "zarr.json")))
    kept = []
    entry = ""
    try:
        for entry in sorted(entries):
            p = root / entry
            if entry in (LEASE_NAME, "zarr.json"):
                continue
            if p.is_symlink():
                # never followed: a link to a Zarr node goes, what it points to stays (a link to
                # anything else is kept, as any other entry that is not part of the store)
                if (p / "zarr.json").exists():
                    p.unlink()
                else:
                    kept.append(entry)
            elif p.is_dir() and (p / "zarr.json").exists():
                shutil.rmtree(p)  # a Zarr node (array or group); links inside it are unlinked, not followed
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()  # an empty folder (a node whose creation stopped before its zarr.json): holds nothing
            else:
                kept.append(entry)
        entry = "zarr.json"
        if "zarr.json" in entries:
            (root / "zarr.json").unlink()  # last: until here the folder is still recognised as our store
    except OSError as exc:
        raise StoreError(f"deleting the store {path!r} stopped at {entry!r} ({exc.strerror or exc}"
                         f"{': ' + repr(str(exc.filename)) if exc.filename else ''}); the store is marked not fully "
                         "created: rerun the job to replace it once that is fixed") from None
    return kept


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _incomplete_root(meta: bytes | None) -> bytes:
    """The root ``zarr.json`` of a store being deleted: its attributes without ``ready`` (a
    metadata that cannot be parsed becomes a bare group marked as ours)."""
    try:
        raw = json.loads(meta) if meta is not None else None
    except ValueError:
        raw = None
    if not (isinstance(raw, dict) and isinstance(raw.get("attributes", {}), dict)):
        raw = {"zarr_format": 3, "node_type": "group", "attributes": {"producer": PRODUCER}}
    raw = dict(raw)
    raw["attributes"] = {k: v for k, v in (raw.get("attributes") or {}).items() if k != "ready"}
    raw["attributes"].setdefault("producer", PRODUCER)
    return json.dumps(raw, indent=2).encode()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # replaces a link itself, never its target


def _clear_remote(url: str, entries: list[str], storage_options: dict[str, Any] | None) -> list[str]:
    import obstore

    store = object_store(url, storage_options)
    if "zarr.json" in entries:  # marked not fully created first, deleted last (see clear_store)
        meta = bytes(obstore.get(store, "zarr.json").bytes())
        obstore.put(store, "zarr.json", _incomplete_root(meta))
    kept, doomed = [], []
    for entry in sorted(entries):
        if entry in (LEASE_NAME, "zarr.json"):
            continue
        try:
            obstore.head(store, f"{entry}/zarr.json")
        except FileNotFoundError:
            kept.append(entry)
            continue
        for batch in obstore.list(store, prefix=f"{entry}/"):
            doomed += [o["path"] for o in batch]
    for i in range(0, len(doomed), 1000):  # the S3 batch-delete limit
        obstore.delete(store, doomed[i:i + 1000])
    if "zarr.json" in entries:
        obstore.delete(store, "zarr.json")
    return kept


def walk_arrays(group: zarr.Group, prefix: str = "", skip_unreadable: bool = False) -> Iterable[tuple[str, Any]]:
    """(path, array) of every array below ``group`` (the lease left out). ``skip_unreadable``: a
    group with a member whose metadata cannot be read is left out instead of raising (``inspect``
    lists what it can; ``check_nodes`` and ``aggregates_status`` say what is damaged)."""
    try:
        members = list(group.members())
    except Exception:
        if skip_unreadable:
            return
        raise
    for name, member in members:
        if not prefix and name == LEASE_NAME:
            continue
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            yield path, member
        else:
            yield from walk_arrays(member, path + "/", skip_unreadable)


def _stored_chunk_keys(arr: Any) -> set[str]:
    """Chunk (shard) keys that exist in the store, relative to the array, from one listing."""
    from zarr.core.sync import sync

    store, prefix = arr.store_path.store, arr.store_path.path.rstrip("/") + "/"

    async def collect() -> set[str]:
        return {k[len(prefix):] async for k in store.list_prefix(prefix) if not k.endswith("zarr.json")}

    return sync(collect())


class UnitWriter:
    """Worker-side: writes one unit's block of every array, each in one call."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None):
        self.path = path
        self.group = zarr.open_group(store=zarr_store(path, storage_options), mode="r+", zarr_format=3)
        self.unit_size = int(self.group.attrs["unit_size"])
        self.n_images = int(self.group.attrs["n_images"])
        self._arrays: dict[str, Any] = {}
        # arrays a newer version computes but an older store has no place for (a 1.0 store being
        # resumed has no ``source_key``): not written, rather than failing the unit
        self.absent = {name for name in (Keys.SOURCE_KEY,) if name not in self.group}
        # (a store made before 1.3 has no ``degenerate/`` group)
        if Keys.DEGENERATE not in self.group:
            self.absent |= {Keys.degenerate(m) for m in self.group.attrs.get("methods", [])}
        #: every per-image array of the store: a unit's write covers each of them
        self.per_image = [name for name, arr in walk_arrays(self.group)
                          if (arr.metadata.dimension_names or ("",))[0] == "image"]

    def _array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name].with_config(WRITE_CONFIG)
        return arr

    def write(self, unit: int, arrays: dict[str, np.ndarray]) -> dict[str, int]:
        """Write the unit's block of every per-image array of the store and return the CRC32C of
        each block as written (``block_checksum``), for the driver to record at commit.

        A unit none of whose images could be attributed computed only its per-image facts
        (``image``, ``label``, ``ok``, ``source_key``): its other arrays are written with their
        fill values (NaN, -1, false), so that a done unit is always complete. A unit with ok
        images must bring every array: one missing is an error, not a block of fill values."""
        start = unit * self.unit_size
        stop = min(self.n_images, start + self.unit_size)
        checksums: dict[str, int] = {}
        for name, value in self._complete(unit, arrays, stop - start).items():
            if name in self.absent:
                continue
            arr = self._array(name)
            if value.shape[0] != stop - start:
                raise ValueError(f"{name}: unit {unit} holds {stop - start} images, got {value.shape[0]}")
            stored = value if value.dtype.kind in "UOT" else value.astype(arr.dtype, copy=False)
            arr[start:stop] = stored
            checksums[name] = block_checksum(stored)
        return checksums

    def _complete(self, unit: int, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """``arrays`` with a block of fill values for each per-image array of the store it lacks,
        when no image of the unit is ok; ``ValueError`` when some are."""
        missing = [name for name in self.per_image if name not in arrays and name not in self.absent]
        if not missing:
            return arrays
        ok = arrays.get(Keys.OK)
        if ok is not None and np.asarray(ok).any():
            raise ValueError(f"unit {unit}: {int(np.asarray(ok).sum())} image(s) are ok but no values were computed "
                             f"for {missing}")
        filled = dict(arrays)
        for name in missing:
            arr = self._array(name)
            fill = arr.fill_value
            if arr.dtype.kind in "UOT":
                filled[name] = np.full((rows, *arr.shape[1:]), "" if fill is None else str(fill), dtype=str)
            else:
                filled[name] = np.full((rows, *arr.shape[1:]), fill, dtype=arr.dtype)
        return filled
