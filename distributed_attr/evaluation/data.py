"""Reading metric arrays out of an attribution store (schema 1.x, see docs/store.md).

Only images that are ``ok`` and belong to a unit marked done are used: a unit that was running
when the job stopped may hold a partial block, and failed images hold fill values.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..io.store import AttributionStore, Keys

def open_store(store: Any) -> zarr.Group:
    """A read-only Zarr group from a path or an open group; ``StoreError`` when it is no fully
    created store of a supported schema (the same checks for both)."""
    if isinstance(store, zarr.Group):
        return _handle(store).group
    return AttributionStore.open(store, mode="r").group


def store_path(store: Any) -> Path | None:
    if isinstance(store, (str, Path)):
        return Path(store)
    path = getattr(getattr(store, "store", None), "root", None)
    return Path(path) if path is not None else None


def model_name(group: zarr.Group, default: str = "model") -> str:
    """The explaining model's name from the store's config (``config.model.name``)."""
    config = group.attrs.get("config") or {}
    model = config.get("model") if isinstance(config, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return str(name) if name else default


def usable_positions(group: zarr.Group) -> np.ndarray:
    """Positions (along the image axis) of images that are ok and in a done unit."""
    return np.flatnonzero(_handle(group).usable())


#: the done units each group is read with while ``reading_units`` holds (by the group's id)
_FROZEN_DONE: dict[int, np.ndarray] = {}


@contextlib.contextmanager
def reading_units(group: zarr.Group, done: np.ndarray):
    """Every read of ``group`` inside (metric tables, usable images, intactness checks) sees the
    units ``done`` (indices) as the done ones, whatever a running job commits meanwhile."""
    handle = _handle(group)
    mask = np.zeros(handle.n_units, dtype=bool)
    mask[np.asarray(done, dtype=np.int64)] = True
    _FROZEN_DONE[id(group)] = mask
    try:
        yield
    finally:
        _FROZEN_DONE.pop(id(group), None)


def _handle(group: zarr.Group) -> AttributionStore:
    """The store handle of an open root group, checked as ``AttributionStore.open`` checks."""
    handle = AttributionStore.from_group(group, str(store_path(group) or "<store>"))
    handle.frozen_done = _FROZEN_DONE.get(id(group))
    return handle


def metric_names(group: zarr.Group) -> list[str]:
    """Metrics present in the store, in the order the store's attributes list them."""
    listed = [str(m) for m in group.attrs.get("metrics", [])]
    if Keys.METRICS not in group:
        return []
    present = {name for name, _ in group[Keys.METRICS].groups()}
    return [m for m in listed if m in present] + sorted(present - set(listed))


def metric_info(metric: str) -> tuple[bool, str]:
    """(higher_is_better, score_output) of a registered metric."""
    from ..metrics import METRICS

    cls = METRICS.get(metric)
    return bool(cls.higher_is_better), str(cls.score_output)


@dataclass
class MetricTable:
    """One output of one metric for every method, restricted to usable images."""

    metric: str
    output: str
    higher_is_better: bool
    cutoffs: np.ndarray  # (K,) cycles per image, inf = unfiltered
    images: np.ndarray  # (n,) global image index
    values: dict[str, np.ndarray]  # method -> (n, K, *trailing) float64
    dims: tuple[str, ...] = ()  # trailing dims
    coords: dict[str, list] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.values)

    @property
    def unfiltered_index(self) -> int:
        inf = np.flatnonzero(np.isinf(self.cutoffs))
        if len(inf) == 0:
            raise ValueError(f"{Keys.METRICS_CUTOFF} of the store has no unfiltered entry (+inf): {self.cutoffs.tolist()}")
        return int(inf[0])

    def cutoff_index(self, cutoff: float) -> int:
        if math.isinf(cutoff):
            return self.unfiltered_index
        hits = np.flatnonzero(np.isclose(self.cutoffs, cutoff))
        if len(hits) == 0:
            raise ValueError(f"cutoff {cutoff} is not in the store; stored cutoffs: {self.cutoffs.tolist()}")
        return int(hits[0])


def load_metric(store: Any, metric: str, output: str | None = None,
                methods: list[str] | None = None) -> MetricTable:
    """Values of ``metrics/<metric>/<output>/<method>`` for usable images (float64).

    ``output`` defaults to the metric's score output."""
    group = open_store(store)
    available = metric_names(group)
    if metric not in available:
        raise ValueError(f"metric {metric!r} is not in the store; metrics in the store: {available}")
    higher, score_output = metric_info(metric)
    output = output or score_output
    mgroup = group[Keys.metric_group(metric)]
    outputs = sorted(name for name, _ in mgroup.groups())
    if output not in outputs:
        raise ValueError(f"metric {metric!r} has no output {output!r}; outputs in the store: {outputs}")
    ogroup = mgroup[output]
    stored_methods = [m for m in (group.attrs.get("methods") or []) if m in ogroup]
    stored_methods += sorted(name for name, _ in ogroup.arrays() if name not in stored_methods)
    if methods is not None:
        unknown = [m for m in methods if m not in stored_methods]
        if unknown:
            raise ValueError(f"methods {unknown} have no {metric}/{output} in the store; methods: {stored_methods}")
        stored_methods = list(methods)
    # Every shard read here must be there and intact: a lost one would read as fill values.
    _handle(group).require_intact([Keys.OK, Keys.IMAGE, *(Keys.metric(metric, output, m) for m in stored_methods)])
    positions = usable_positions(group)
    images = np.asarray(group[Keys.IMAGE][:])[positions]
    cutoffs = np.asarray(group[Keys.METRICS_CUTOFF][:], dtype=np.float64)
    values: dict[str, np.ndarray] = {}
    dims: tuple[str, ...] = ()
    coords: dict[str, list] = {}
    for method in stored_methods:
        arr = ogroup[method]
        data = np.asarray(arr[:], dtype=np.float64)[positions]
        values[method] = data
        names = tuple(arr.metadata.dimension_names or ())
        dims = names[2:] if len(names) >= 2 else tuple(f"dim_{i}" for i in range(data.ndim - 2))
        coords = dict(arr.attrs.get("coords") or {})
    return MetricTable(metric, output, higher, cutoffs, images, values, dims, coords)
