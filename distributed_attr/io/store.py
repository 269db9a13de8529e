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
      units/done, units/seconds   (unit,)   bookkeeping, written by the driver only

Concurrency rules, because Zarr silently loses data when two writers touch one shard:
every array is sharded (or chunked) along ``image`` in blocks of exactly ``unit_size`` images, a
work unit writes each of its arrays in one call covering exactly its block, and only the driver
writes metadata (group attributes, ``units/``). All arrays are created at full size before any
worker starts: resizing rewrites metadata and races.
"""
from __future__ import annotations

import datetime as _dt
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

SCHEMA_VERSION = "1.0"


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

    @property
    def n_units(self) -> int:
        return (self.n_images + self.unit_size - 1) // self.unit_size

    def arrays(self) -> list[ArraySpec]:
        n, (_, h, w) = self.n_images, self.image_shape
        specs = [
            ArraySpec("image", ("image",), (n,), "int64"),
            ArraySpec("label", ("image",), (n,), "int64"),
            ArraySpec("target", ("image",), (n,), "int64"),
            ArraySpec("prediction", ("image",), (n,), "int64"),
            ArraySpec("probability", ("image",), (n,), "float32"),
            ArraySpec("ok", ("image",), (n,), "bool"),
        ]
        k = len(self.cutoffs)
        for m in self.methods:
            specs.append(ArraySpec(f"maps/{m}", ("image", "y", "x"), (n, h, w), self.map_dtype))
            if self.stored_cutoffs:
                specs.append(ArraySpec(f"filtered_maps/{m}", ("image", "stored_cutoff", "y", "x"),
                                       (n, len(self.stored_cutoffs), h, w), self.map_dtype))
            if self.frequencies is not None:
                specs.append(ArraySpec(f"spectra/{m}", ("image", "cutoff", "frequency"),
                                       (n, k, len(self.frequencies)), "float32"))
                specs.append(ArraySpec(f"hf_fraction/{m}", ("image", "cutoff"), (n, k), "float32"))
            for metric, outputs in self.metric_outputs.items():
                for out, (dims, sizes, coords) in outputs.items():
                    specs.append(ArraySpec(f"metrics/{metric}/{out}/{m}", ("image", "cutoff", *dims),
                                           (n, k, *sizes), "float32", {"coords": coords}))
        return specs


def _inner_chunk(unit_size: int, bytes_per_image: int, target: int = 1 << 18) -> int:
    """Largest divisor of ``unit_size`` whose chunk stays under ``target`` bytes (>= 1)."""
    best = 1
    for c in range(1, unit_size + 1):
        if unit_size % c == 0 and c * bytes_per_image <= target:
            best = c
    return best


def _fill(dtype: str) -> Any:
    if dtype.startswith("float"):
        return float("nan")
    if dtype == "bool":
        return False
    return -1


class AttributionStore:
    """Driver-side handle: create, resume, record progress. Workers use ``UnitWriter``."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = str(path)
        self.group = group

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, plan: StorePlan) -> "AttributionStore":
        path = Path(path)
        if path.exists():
            shutil.rmtree(path)
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        for spec in plan.arrays():
            per_image = int(np.prod(spec.shape[1:], dtype=np.int64)) * np.dtype(spec.dtype).itemsize
            chunk0 = _inner_chunk(plan.unit_size, max(1, per_image))
            shards = None
            if chunk0 < plan.unit_size:
                shards = (plan.unit_size, *spec.shape[1:])
            root.create_array(
                spec.path,
                shape=spec.shape,
                chunks=(chunk0, *spec.shape[1:]),
                shards=shards,
                dtype=spec.dtype,
                fill_value=_fill(spec.dtype),
                dimension_names=list(spec.dims),
                attributes=spec.attrs,
            )
        # Coordinates inside each group, so xarray.open_zarr(store, group=...) sees them.
        groups_with_cutoff = ["spectra", "hf_fraction", "metrics"] if plan.frequencies is not None else ["metrics"]
        for g in groups_with_cutoff:
            root.create_array(f"{g}/cutoff", data=np.asarray(plan.cutoffs, dtype="float64"),
                              dimension_names=["cutoff"], attributes={"units": "cycles per image; inf = unfiltered"})
        if plan.frequencies is not None:
            root.create_array("spectra/frequency", data=np.asarray(plan.frequencies, dtype="float64"),
                              dimension_names=["frequency"], attributes={"units": "cycles per pixel"})
        if plan.stored_cutoffs:
            root.create_array("filtered_maps/stored_cutoff", data=np.asarray(plan.stored_cutoffs, dtype="float64"),
                              dimension_names=["stored_cutoff"], attributes={"units": "cycles per image"})
        root.create_array("units/done", shape=(plan.n_units,), chunks=(1,), dtype="uint8", fill_value=0,
                          dimension_names=["unit"])
        root.create_array("units/seconds", shape=(plan.n_units,), chunks=(1,), dtype="float32",
                          fill_value=float("nan"), dimension_names=["unit"])
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
        )
        # Written last: a store without ``ready`` was interrupted while being created.
        attrs["ready"] = True
        root.attrs.update(attrs)
        return cls(path, root)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> "AttributionStore":
        if not Path(path).exists():
            raise StoreError(f"no store at {str(path)!r}")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{str(path)!r} is not a readable Zarr v3 store: {exc}") from None
        if not group.attrs.get("ready"):
            raise StoreError(f"{str(path)!r} was not fully created (interrupted); rerun with --overwrite")
        version = str(group.attrs.get("schema_version", "?"))
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise StoreError(f"{str(path)!r} has schema {version}; this version reads {SCHEMA_VERSION}")
        return cls(path, group)

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

    def done_units(self) -> np.ndarray:
        return np.flatnonzero(self.group["units/done"][:] == 1)

    def failures(self) -> dict[int, str]:
        return {int(k): v for k, v in dict(self.group.attrs.get("failures", {})).items()}

    # -- driver-only writes ----------------------------------------------------------------------
    def commit_unit(self, unit: int, seconds: float, failures: dict[int, str]) -> None:
        """Record a unit whose data are already durable: failures first, the done flag last."""
        if failures:
            merged = {str(k): v for k, v in self.group.attrs.get("failures", {}).items()}
            merged.update({str(k): v for k, v in failures.items()})
            self.group.attrs["failures"] = merged
        self.group["units/seconds"][unit] = seconds
        self.group["units/done"][unit] = 1

    def set_attrs(self, **attrs: Any) -> None:
        self.group.attrs.update(attrs)


class UnitWriter:
    """Worker-side: writes one unit's block of every array, each in one call."""

    def __init__(self, path: str):
        self.path = path
        self.group = zarr.open_group(path, mode="r+", zarr_format=3)
        self.unit_size = int(self.group.attrs["unit_size"])
        self.n_images = int(self.group.attrs["n_images"])
        self._arrays: dict[str, Any] = {}

    def _array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

    def write(self, unit: int, arrays: dict[str, np.ndarray]) -> None:
        start = unit * self.unit_size
        stop = min(self.n_images, start + self.unit_size)
        for name, value in arrays.items():
            arr = self._array(name)
            if value.shape[0] != stop - start:
                raise ValueError(f"{name}: unit {unit} holds {stop - start} images, got {value.shape[0]}")
            arr[start:stop] = value.astype(arr.dtype, copy=False)
