"""Radial (azimuthally averaged) power spectra of attribution maps.

The recipe (documented with its exact identities in docs/spectra.md):

* no window and no mean removal: the map is treated as one period of a periodic signal, as the
  FFT does; the mean is the frequency-0 bin, which holds nothing else, so it is easy to leave out;
* power of a coefficient ``P(k) = |F(k)|^2 / (H W)`` with ``F = fft2(map)`` (computed with
  ``rfft2``; each half-plane column other than 0 and, for even widths, W/2 stands for itself and
  its mirror, so it counts twice). With that scale white noise of variance s^2 has a flat profile
  at s^2 whatever the image size;
* radial frequency of coefficient (ky, kx) in cycles per pixel: ``sqrt((ky/H)^2 + (kx/W)^2)``
  with signed integer indices ky, kx;
* bins: ``M = max(H, W)``, ``F = M // 2 + 1`` bins of width 1/M centred on ``b / M``
  (b = 0..F-1); a coefficient goes to bin ``round(r M)``; the corners beyond the last centre
  (up to 0.707 cycles per pixel) fall into the last bin, so that every coefficient is counted;
  bin 0 holds the mean (DC) and nothing else;
* the profile is the mean power per coefficient in each bin. Parseval then reads
  ``sum_b profile[b] * counts[b] == sum over pixels of map^2`` (``counts`` from
  ``radial_bin_counts``: how many coefficients of the full H x W plane fall in each bin).

Everything here is a pure, batched tensor function running on the maps' device; the binning
matrices are built once per (height, width, device, dtype) and cached.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

#: non-DC energy at or below this share of a map's total energy is float rounding, not content
NUMERICAL_FLOOR = 1e-10

__all__ = [
    "NUMERICAL_FLOOR",
    "radial_frequencies",
    "radial_bin_counts",
    "radial_bin_index",
    "radial_spectrum",
    "high_frequency_fraction",
    "high_frequency_fraction_from_spectrum",
    "as_maps",
]


def signed_index(n: int) -> np.ndarray:
    """FFT index k = 0..n-1 as a signed integer frequency (cycles per image along that axis), the
    order ``numpy.fft.fftfreq(n) * n`` gives but exact: n/2 (even n) is -n/2."""
    k = np.arange(n, dtype=np.int64)
    return np.where(k <= (n - 1) // 2, k, k - n)


def _check_size(height: int, width: int) -> tuple[int, int]:
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"map size must be at least 1 x 1, got {height} x {width}")
    return height, width


def radial_frequencies(height: int, width: int) -> np.ndarray:
    """Bin centres ``b / max(H, W)`` in cycles per pixel, b = 0..max(H, W) // 2 (0 to 0.5)."""
    height, width = _check_size(height, width)
    m = max(height, width)
    return np.arange(m // 2 + 1, dtype=np.float64) / m


@lru_cache(maxsize=32)
def _geometry(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin index (H, W//2+1), half-plane multiplicity (W//2+1,), counts per bin (F,))."""
    m = max(height, width)
    n_bins = m // 2 + 1
    ky = signed_index(height).astype(np.float64)[:, None]
    kx = np.arange(width // 2 + 1, dtype=np.float64)[None, :]
    # r * M computed from integers: exact for square maps (no fftfreq rounding at bin edges)
    r_m = np.sqrt((ky * (m / height)) ** 2 + (kx * (m / width)) ** 2)
    index = np.minimum(np.floor(r_m + 0.5).astype(np.int64), n_bins - 1)
    multiplicity = np.full(width // 2 + 1, 2.0)
    multiplicity[0] = 1.0
    if width % 2 == 0:
        multiplicity[-1] = 1.0  # the Nyquist column is its own mirror
    counts = np.bincount(
        index.ravel(), weights=np.broadcast_to(multiplicity, index.shape).ravel(), minlength=n_bins
    )
    index.setflags(write=False)
    multiplicity.setflags(write=False)
    counts.setflags(write=False)
    return index, multiplicity, counts


def radial_bin_counts(height: int, width: int) -> np.ndarray:
    """Number of coefficients of the full H x W Fourier plane in each bin (float64, sums to H W)."""
    height, width = _check_size(height, width)
    return _geometry(height, width)[2].copy()


def radial_bin_index(height: int, width: int) -> np.ndarray:
    """The bin of each ``rfft2`` coefficient, (H, W // 2 + 1) int64."""
    height, width = _check_size(height, width)
    return _geometry(height, width)[0].copy()


@lru_cache(maxsize=32)
def _binning_matrix(height: int, width: int, device: str, dtype: torch.dtype) -> Tensor:
    """(H * (W//2+1), F) matrix turning |rfft2|^2 into the radial profile in one matmul:
    entry = multiplicity / (count of the bin * H * W). A dense matmul is deterministic on every
    device (scatter-add on CUDA is not) and costs ~F multiply-adds per coefficient."""
    index, multiplicity, counts = _geometry(height, width)
    weights = np.broadcast_to(multiplicity, index.shape) / (counts[index] * height * width)
    n_coef = index.size
    mat = np.zeros((n_coef, counts.size), dtype=np.float64)
    mat[np.arange(n_coef), index.ravel()] = weights.ravel()
    return torch.from_numpy(mat).to(device=device, dtype=dtype)


def half_plane_power(x: Tensor) -> Tensor:
    """``|rfft2(x)|^2`` (..., H, W//2+1), computed in the input's precision (float32 at least)."""
    coef = torch.fft.rfft2(x)
    return coef.real.square() + coef.imag.square()


def as_maps(maps: Tensor, *, allow_channels: bool = False) -> Tensor:
    """(N, H, W) floating maps (float32 unless float64 was given); (N, C, H, W) is averaged over
    channels when ``allow_channels``. Half precision is widened: FFTs need at least float32."""
    if not isinstance(maps, Tensor):
        maps = torch.as_tensor(maps)
    if maps.dim() == 4 and allow_channels:
        maps = maps.float().mean(dim=1) if maps.dtype != torch.float64 else maps.mean(dim=1)
    if maps.dim() != 3:
        shapes = "(N, H, W) or (N, C, H, W)" if allow_channels else "(N, H, W)"
        raise ValueError(f"maps must have shape {shapes}, got {tuple(maps.shape)}")
    if maps.dtype != torch.float64:
        maps = maps.float()
    return maps


def power_to_profile(power: Tensor, height: int, width: int) -> Tensor:
    """Radial profile (..., F) of half-plane power ``|rfft2|^2`` (..., H, W//2+1)."""
    mat = _binning_matrix(height, width, str(power.device), power.dtype)
    lead = power.shape[:-2]
    return (power.reshape(-1, power.shape[-2] * power.shape[-1]) @ mat).reshape(*lead, mat.shape[1])


def radial_spectrum(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Frequencies (F,) in cycles per pixel and the radial power profile (N, F) of each map.

    ``maps`` (N, H, W), any floating dtype, any device; float16/bfloat16 are computed in float32,
    float64 stays float64. A NaN map (a failed image) gives a NaN profile."""
    maps = as_maps(maps)
    _, height, width = maps.shape
    freqs = torch.from_numpy(radial_frequencies(height, width)).to(maps.device, maps.dtype)
    return freqs, power_to_profile(half_plane_power(maps), height, width)


def high_frequency_fraction_from_spectrum(
    freqs: Tensor, profile: Tensor, counts: Tensor, cutoff: float
) -> Tensor:
    """Share of the non-DC energy in the bins whose centre is above ``cutoff`` cycles per pixel.

    energy of a bin = profile x count (Parseval); the DC bin (the map's mean) is in neither the
    numerator nor the denominator, so a constant offset does not change the fraction. A map whose
    non-DC energy is at most ``NUMERICAL_FLOOR`` (1e-10) of its total energy is constant up to
    float rounding (e.g. low-passed below the first ring) and gives 0; a NaN profile gives NaN."""
    counts = torch.as_tensor(counts, dtype=profile.dtype, device=profile.device)
    freqs = torch.as_tensor(freqs, device=profile.device)
    # energies as three dot products with the bin counts: no (..., F) temporaries, which matters
    # when the aggregation calls this on (images, cutoffs, F) float64 spectra
    high = profile @ (counts * ((freqs > cutoff) & (freqs > 0)))
    total = profile @ (counts * (freqs > 0))
    constant = total <= NUMERICAL_FLOOR * (profile @ counts)
    return torch.where(constant, torch.zeros_like(total), high / total)


def high_frequency_fraction(maps: Tensor, cutoff: float) -> Tensor:
    """(N,) fraction of each map's power (DC excluded) at radial frequencies above ``cutoff``
    cycles per pixel, measured on the radial bins (see ``high_frequency_fraction_from_spectrum``)."""
    maps = as_maps(maps)
    freqs, profile = radial_spectrum(maps)
    counts = torch.from_numpy(radial_bin_counts(*maps.shape[-2:]))
    return high_frequency_fraction_from_spectrum(freqs, profile, counts, float(cutoff))
