"""What the driver tells each reader task (``ReadPlan``, built from a store's attributes) and what
a reader sends back (``PartialAggregate``), with the arrays the job reads and the messages about
the store."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ..io.storage import is_remote
from ..io.store import Keys, damaged_message
from .stats import GroupedMoments

#: about the most decoded bytes one block holds (whole units only; at least one unit); a task
#: holds two blocks. Fewer, bigger blocks pay the per-block grouping fewer times (measured on
#: the benchmark store: 3-unit blocks 1.3x slower than 4-unit ones)
READ_BYTES = 64 << 20
#: threads a reader task uses: that many read arrays of the next block while as many reduce the
#: current block's methods (file reads, zstd and NumPy's loops release the GIL); 1 = everything in
#: the task's own thread, one core (what the scaling benchmark uses)
THREADS = 2
#: default frequency (cycles per pixel) above which power counts as high-frequency: the Nyquist
#: frequency of a stride-2 stage, i.e. the band a 2x subsampling aliases into
DEFAULT_HF_CUTOFF = 0.25


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


def reader_note(store: str, plan: ReadPlan) -> str:
    """Which reader the tasks use, and why (the fast one needs local files in our layout)."""
    if not plan.fast_reads:
        return "zarr (fast reads switched off)"
    if is_remote(store):
        return "zarr (the store is on object storage; the fast shard reader reads local files only)"
    return "fast (whole local shards, decompressed into reused buffers)"


def arrays_read(plan: ReadPlan) -> list[str]:
    """Every array the job reads, in one place for the readers and the integrity checks."""
    names = [Keys.OK, Keys.TARGET]
    for m in plan.methods:
        if plan.read_maps or not plan.have_spectra:
            names.append(Keys.maps(m))
        if plan.have_spectra:
            names.append(Keys.spectra(m))
        if plan.have_stored_hf:
            names.append(Keys.hf_fraction(m))
    return names


def damaged_shard_message(store: str, bad: dict[int, str], units_word: str = "unit(s)") -> str:
    return damaged_message(store, bad, units_word, outcome="; no aggregate was written")


def make_plan(store: str, root: zarr.Group, read_maps: bool) -> ReadPlan:
    """The plan every reader task follows, from the store's attributes and coordinates."""
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
