"""A synthetic attribution store following the schema (docs/store.md), for tests and benchmarks.

Laid out and written as a job's store is: created by ``AttributionStore.create`` from a
``StorePlan`` (so it is of the current schema, ``SCHEMA_VERSION``, marked with ``PRODUCER``),
each unit's block written by ``UnitWriter`` and the done units committed by the store handle.
Only the data are synthetic: maps are random fields with a power-law spectrum (a rougher one per
method, like gradients vs smoother methods) plus a class-dependent blob, and ``spectra/`` and
``hf_fraction/`` are computed from the stored (rounded) maps as the workers compute them
(``spectral.spectra_by_cutoff``).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.store import AttributionStore, Keys, StorePlan, UnitWriter
from ..spectral import REFERENCE_SWEEP, scaled_cutoffs

__all__ = ["write_synthetic_store"]


def _power_law_fields(rng: np.random.Generator, n: int, h: int, w: int, exponent: float) -> np.ndarray:
    """White noise shaped to power ~ f^-exponent (float32)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    r = np.sqrt(fy**2 + fx**2)
    r[0, 0] = 1.0 / max(h, w)
    gain = r ** (-exponent / 2.0)
    noise = rng.standard_normal((n, h, w)).astype(np.float32)
    return np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(h, w)).astype(np.float32)


def write_synthetic_store(
    path: str | Path,
    *,
    n_images: int = 4096,
    unit_size: int = 256,
    height: int = 64,
    width: int | None = None,
    methods: Sequence[str] = ("saliency", "integrated_gradients"),
    n_classes: int = 10,
    seed: int = 0,
    done_units: Sequence[int] | None = None,
    failed: Sequence[int] = (),
    map_dtype: str = "float16",
    sweep: Sequence[float] = REFERENCE_SWEEP,
    filter_kind: str = "forgrad",
    hf_cutoff: float = 0.25,
    with_spectra: bool = True,
) -> str:
    """Create the store at ``path`` (replacing it) and return its path.

    ``done_units``: units marked done (default all); ``failed``: global indices with ok=False
    (their maps and spectra are NaN, as a worker writes them)."""
    import torch

    from ..methods.degenerate import degenerate_flags
    from ..spectral import (
        high_frequency_fraction_from_spectrum,
        radial_bin_counts,
        radial_frequencies,
        spectra_by_cutoff,
    )

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    width = width or height
    rng = np.random.default_rng(seed)
    cutoffs = [math.inf] + scaled_cutoffs(sweep, min(height, width), 224)
    freqs = radial_frequencies(height, width)
    counts = torch.from_numpy(radial_bin_counts(height, width))
    n = n_images
    plan = StorePlan(
        n_images=n, unit_size=unit_size, image_shape=(1, height, width), methods=list(methods),
        map_dtype=map_dtype, frequencies=freqs.tolist() if with_spectra else None, cutoffs=cutoffs,
        attrs={"config": {"spectra": {"enabled": with_spectra, "hf_cutoff": hf_cutoff},
                          "filters": {"kind": filter_kind, "sweep": list(sweep), "reference_size": 224, "order": 2},
                          "data": {"image_size": min(height, width)}}},
    )
    store = AttributionStore.create(path, plan)
    writer = UnitWriter(str(path))
    failed_set = {int(i) for i in failed}
    checksums: dict[int, dict[str, int]] = {}  # what each unit's write returns, recorded at commit
    yy, xx = np.mgrid[:height, :width]
    blobs = np.stack([np.exp(-(((yy - height * (0.2 + 0.6 * (c % 3) / 2)) / (0.15 * height)) ** 2
                               + ((xx - width * (0.2 + 0.6 * (c // 3 % 3) / 2)) / (0.15 * width)) ** 2))
                      for c in range(n_classes)]).astype(np.float32)
    for u in range(plan.n_units):
        start, stop = u * unit_size, min(n, (u + 1) * unit_size)
        k = stop - start
        idx = np.arange(start, stop)
        label = rng.integers(0, n_classes, size=k)
        target = np.where(rng.random(k) < 0.9, label, rng.integers(0, n_classes, size=k))
        ok = np.array([i not in failed_set for i in idx])
        block = {Keys.IMAGE: idx, Keys.LABEL: label, Keys.TARGET: target, Keys.PREDICTION: target,
                 Keys.PROBABILITY: rng.uniform(0.3, 1.0, size=k).astype(np.float32), Keys.OK: ok,
                 Keys.SOURCE_KEY: np.asarray([f"synthetic:{i}" for i in idx], dtype=str)}
        for j, m in enumerate(methods):
            exponent = 0.5 + 1.5 * j / max(1, len(methods) - 1)  # first method roughest
            maps = _power_law_fields(rng, k, height, width, exponent) * 0.2 + 2.0 * blobs[target]
            maps = np.abs(maps) if j == 0 else maps
            maps[~ok] = np.nan
            stored = maps.astype(map_dtype)
            block[Keys.maps(m)] = stored
            # the flags a worker computes on the ok images' raw maps (failed images keep 0)
            flags = degenerate_flags(torch.from_numpy(stored)).numpy()  # as stored, in its dtype
            block[Keys.degenerate(m)] = np.where(ok, flags, 0).astype(np.uint8)
            if with_spectra:
                x = torch.from_numpy(stored.astype(np.float32))
                # unfiltered (cutoff +inf) = the raw map, then the sweep with the config's filter
                spec = spectra_by_cutoff(x, cutoffs, kind=filter_kind, order=2)[1].numpy()
                block[Keys.spectra(m)] = spec
                hf = high_frequency_fraction_from_spectrum(torch.from_numpy(freqs), torch.from_numpy(spec),
                                                           counts, hf_cutoff)
                block[Keys.hf_fraction(m)] = hf.numpy().astype(np.float32)
        checksums[u] = writer.write(u, block)
    for u in (range(plan.n_units) if done_units is None else sorted({int(u) for u in done_units})):
        store.commit_unit(u, float("nan"), {}, checksums=checksums[u])  # no time was spent: seconds stay NaN
    store.set_attrs(failures={str(i): "synthetic failure" for i in sorted(failed_set)})  # flushes the commits
    return str(path)
