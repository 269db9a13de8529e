"""The statistics behind cutoff selection and rankings: a stable validation split and the
bootstrap over images.

The split depends on (seed, global image index) only, through a 64-bit integer hash, so an image
stays on its side when the dataset grows or is processed in another order.

The bootstrap resamples images. Every replicate is a vector of per-image weights, and all the
quantities of interest are weighted means, so one weight matrix serves every column at once
(methods x cutoffs x metrics) and a paired comparison uses the same weights on both sides. Up to
``EXACT_LIMIT`` image-replicate pairs the weights are multinomial counts (the classic bootstrap);
above, independent Poisson(1) counts drawn chunk by chunk (the Poisson bootstrap, equivalent for
large n), so memory stays bounded on a million images.
"""
from __future__ import annotations

import numpy as np

EXACT_LIMIT = 20_000_000
_CHUNK = 65_536


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def split_uniform(image_index: np.ndarray, seed: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per global image index, fixed by (seed, index)."""
    idx = np.asarray(image_index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = idx ^ _splitmix64(np.asarray([seed], dtype=np.int64))[0]
    return (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def validation_mask(image_index: np.ndarray, fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """True for images in the validation subset (about ``fraction`` of them)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    return split_uniform(image_index, seed) < fraction


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of the column means of ``values`` (n, Q): (n_boot, Q).

    Rows are images; every replicate resamples rows with replacement, the same rows for every
    column (so differences of columns are paired)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n, q = values.shape
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of images")
    rng = np.random.default_rng(seed)
    if n * n_boot <= EXACT_LIMIT:
        out = np.empty((n_boot, q))
        for b in range(n_boot):
            counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
            out[b] = counts @ values / n
        return out
    sums = np.zeros((n_boot, q))
    totals = np.zeros((n_boot, 1))
    for start in range(0, n, _CHUNK):
        block = values[start : start + _CHUNK]
        w = rng.poisson(1.0, size=(n_boot, block.shape[0])).astype(np.float64)
        sums += w @ block
        totals += w.sum(axis=1, keepdims=True)
    return sums / np.maximum(totals, 1.0)


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap replicates along axis 0."""
    alpha = (1.0 - level) / 2.0
    return np.quantile(replicates, alpha, axis=0), np.quantile(replicates, 1.0 - alpha, axis=0)


def rank_rows(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Ranks along the last axis, 1 = best, ties sharing their average rank."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    return rankdata(-s if higher_is_better else s, method="average", axis=-1)
