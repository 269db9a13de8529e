"""Pure NumPy spectral helpers of the aggregation job (slopes, high-frequency fractions); the
spectra computed from maps for a store that has none are the readers' (``reader.spectra_from_maps``)."""
from __future__ import annotations

import math

import numpy as np

from ..spectral.radial import NUMERICAL_FLOOR  # one floor for the torch and NumPy spectral maths

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
    """``spectral.high_frequency_fraction_from_spectrum`` on NumPy arrays, in float64 (no copy:
    the tensors share the arrays' memory)."""
    import torch

    from ..spectral import high_frequency_fraction_from_spectrum

    f, p, c = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (freqs, power, counts))
    return high_frequency_fraction_from_spectrum(f, p, c, float(cutoff)).numpy()
