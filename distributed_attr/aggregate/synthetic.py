"""A synthetic attribution store following the schema (docs/store.md), for tests and benchmarks.

Written with plain zarr, independently of the job's writer: root attributes, per-image arrays,
``maps/<method>`` sharded by ``unit_size`` images, ``spectra/`` and ``hf_fraction/`` computed from
the stored (rounded) maps, and ``units/done``. Maps are random fields with a power-law spectrum
(a rougher one per method, like gradients vs smoother methods) plus a class-dependent blob.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from ..io.store import Keys, inner_chunk  # the same chunking policy as the job's stores
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

    from ..spectral import cutoff_sweep_spectra, high_frequency_fraction_from_spectrum, radial_bin_counts
    from ..spectral import radial_frequencies, radial_spectrum

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    width = width or height
    n_units = (n_images + unit_size - 1) // unit_size
    rng = np.random.default_rng(seed)
    cutoffs = [math.inf] + scaled_cutoffs(sweep, min(height, width), 224)
    freqs = radial_frequencies(height, width)
    counts = torch.from_numpy(radial_bin_counts(height, width))
    root = zarr.open_group(str(path), mode="w", zarr_format=3)

    def create(name, shape, dtype, dims, fill):
        per_image = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        c0 = inner_chunk(unit_size, max(1, per_image))
        return root.create_array(name, shape=shape, chunks=(c0, *shape[1:]),
                                 shards=(unit_size, *shape[1:]) if c0 < unit_size else None,
                                 dtype=dtype, fill_value=fill, dimension_names=list(dims))

    n = n_images
    arrays = {
        "image": create("image", (n,), "int64", ["image"], -1),
        "label": create("label", (n,), "int64", ["image"], -1),
        "target": create("target", (n,), "int64", ["image"], -1),
        "prediction": create("prediction", (n,), "int64", ["image"], -1),
        "probability": create("probability", (n,), "float32", ["image"], float("nan")),
        "ok": create("ok", (n,), "bool", ["image"], False),
    }
    for m in methods:
        arrays[Keys.maps(m)] = create(Keys.maps(m), (n, height, width), map_dtype, ["image", "y", "x"], float("nan"))
        if with_spectra:
            arrays[Keys.spectra(m)] = create(Keys.spectra(m), (n, len(cutoffs), freqs.size), "float32",
                                            ["image", "cutoff", "frequency"], float("nan"))
            arrays[Keys.hf_fraction(m)] = create(Keys.hf_fraction(m), (n, len(cutoffs)), "float32",
                                                ["image", "cutoff"], float("nan"))
    if with_spectra:
        for g in ("spectra", "hf_fraction"):
            root.create_array(f"{g}/cutoff", data=np.asarray(cutoffs, dtype="float64"), dimension_names=["cutoff"])
        root.create_array(Keys.FREQUENCY, data=freqs, dimension_names=["frequency"])
    done_arr = root.create_array(Keys.UNITS_DONE, shape=(n_units,), chunks=(1,), dtype="uint8", fill_value=0,
                                 dimension_names=["unit"])
    root.create_array(Keys.UNITS_SECONDS, shape=(n_units,), chunks=(1,), dtype="float32", fill_value=float("nan"),
                      dimension_names=["unit"])
    failed_set = {int(i) for i in failed}
    yy, xx = np.mgrid[:height, :width]
    blobs = np.stack([np.exp(-(((yy - height * (0.2 + 0.6 * (c % 3) / 2)) / (0.15 * height)) ** 2
                               + ((xx - width * (0.2 + 0.6 * (c // 3 % 3) / 2)) / (0.15 * width)) ** 2))
                      for c in range(n_classes)]).astype(np.float32)
    for u in range(n_units):
        start, stop = u * unit_size, min(n, (u + 1) * unit_size)
        k = stop - start
        idx = np.arange(start, stop)
        label = rng.integers(0, n_classes, size=k)
        target = np.where(rng.random(k) < 0.9, label, rng.integers(0, n_classes, size=k))
        ok = np.array([i not in failed_set for i in idx])
        block = {"image": idx, "label": label, "target": target, "prediction": target,
                 "probability": rng.uniform(0.3, 1.0, size=k).astype(np.float32), "ok": ok}
        for j, m in enumerate(methods):
            exponent = 0.5 + 1.5 * j / max(1, len(methods) - 1)  # first method roughest
            maps = _power_law_fields(rng, k, height, width, exponent) * 0.2 + 2.0 * blobs[target]
            maps = np.abs(maps) if j == 0 else maps
            maps[~ok] = np.nan
            stored = maps.astype(map_dtype)
            block[Keys.maps(m)] = stored
            if with_spectra:
                x = torch.from_numpy(stored.astype(np.float32))
                spec = np.empty((k, len(cutoffs), freqs.size), dtype=np.float32)
                spec[:, 0] = radial_spectrum(x)[1].numpy()  # unfiltered: the raw map
                spec[:, 1:] = cutoff_sweep_spectra(x, cutoffs[1:], kind=filter_kind)[1].numpy()
                block[Keys.spectra(m)] = spec
                hf = high_frequency_fraction_from_spectrum(torch.from_numpy(freqs), torch.from_numpy(spec),
                                                           counts, hf_cutoff)
                block[Keys.hf_fraction(m)] = hf.numpy().astype(np.float32)
        for name, value in block.items():
            arrays[name][start:stop] = value
    done = np.zeros(n_units, dtype=np.uint8)
    done[list(range(n_units)) if done_units is None else list(done_units)] = 1
    done_arr[:] = done
    root.attrs.update(
        schema_version="1.0",
        unit_size=unit_size,
        n_images=n_images,
        n_units=n_units,
        methods=list(methods),
        image_shape=[1, height, width],
        config={"spectra": {"enabled": with_spectra, "hf_cutoff": hf_cutoff},
                "filters": {"kind": filter_kind, "sweep": list(sweep), "reference_size": 224, "order": 2},
                "data": {"image_size": min(height, width)}},
        failures={str(i): "synthetic failure" for i in sorted(failed_set)},
        ready=True,
    )
    return str(path)
