"""Pure NumPy spectral helpers of the aggregation job (slopes, high-frequency fractions), and
spectra computed from maps for a store that has none."""
from __future__ import annotations

import math

import numpy as np

from ..spectral.radial import NUMERICAL_FLOOR  # one floor for the torch and NumPy spectral maths
from .plan import ReadPlan

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
