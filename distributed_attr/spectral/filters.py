"""Low-pass filters for attribution maps, with FORGrad's cutoff units (cycles per image).

``low_pass(maps, cutoff, kind)``: ``cutoff`` is sigma in cycles per image, measured along the
shorter side ``S = min(H, W)``: a coefficient with signed integer indices (ky, kx) sits at
``sqrt((ky S / H)^2 + (kx S / W)^2)`` cycles per image, i.e. ``S x`` its radial frequency in
cycles per pixel. For square maps that is Xplique's ``sqrt(ky^2 + kx^2)``; sigma = 15 at 224 px
(the paper's recommendation) is 0.067 cycles per pixel.

kinds
-----
``forgrad``  Xplique's ``forgrad`` (xplique/commons/forgrad.py), reproduced step by step, quirks
             included: mean over channels, absolute value, ``rfft2``, a binary disk
             ``dist <= sigma`` built on the *centred* grid (centre ``(H // 2, W // 2)``) and then
             ``fftshift``-ed, half plane kept, ``irfft2`` with the default output length
             (``2 (W // 2)``: an odd width loses a column), absolute value, and for odd widths a
             bicubic resize back to W as TensorFlow's ``tf.image.resize(..., "bicubic")`` does it
             (Keys cubic a = -0.5, half-pixel centres, taps outside the image weighted 0 and the
             rest renormalised, kernel offsets quantised to 1/1024). For odd sizes ``fftshift``
             moves the disk's centre to index n-1 rather than 0, i.e. the disk is centred on
             frequency -1 along that axis instead of 0. Non-square maps (Xplique rejects them)
             use the same recipe with the distances scaled as above.
``ideal``    the same disk, centred correctly on frequency 0 for every size, on the signed map
             (no absolute values), output exactly (H, W).
``gaussian`` transfer ``exp(-r^2 / (2 sigma^2))``, r in cycles per image, signed map.
``butterworth`` transfer ``1 / (1 + (r / sigma)^(2 order))`` (Gonzalez & Woods' form: 1/2 at r =
             sigma), signed map.

``cutoff = inf`` means "unfiltered": the map after the kind's pre-processing (``|mean_c map|``
for forgrad, ``mean_c map`` for the others), so a sweep that starts with inf is consistent.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .radial import as_maps, half_plane_power, power_to_profile, radial_frequencies, radial_spectrum, signed_index

__all__ = [
    "REFERENCE_SWEEP",
    "LOW_PASS_KINDS",
    "low_pass",
    "scaled_cutoffs",
    "transfer_function",
    "cutoff_sweep_spectra",
]

#: Xplique's FORGrad tutorial sweep of sigma at 224 px (cycles per image), largest first.
REFERENCE_SWEEP: tuple[int, ...] = (224, 200, 125, 100, 50, 30, 20, 15, 7, 4)

LOW_PASS_KINDS = ("forgrad", "ideal", "gaussian", "butterworth")


def scaled_cutoffs(
    reference_sweep: Sequence[float] = REFERENCE_SWEEP, image_size: int = 224, reference_size: int = 224
) -> list[float]:
    """The sweep rescaled to another image size at equal cycles per pixel:
    ``sigma * image_size / reference_size`` (sigma = 15 at 224 px -> 2.14 at 32 px)."""
    if image_size <= 0 or reference_size <= 0:
        raise ValueError(f"image_size and reference_size must be positive, got {image_size}, {reference_size}")
    return [float(s) * image_size / reference_size for s in reference_sweep]


def _check(kind: str, cutoff: float, order: int) -> float:
    if kind not in LOW_PASS_KINDS:
        raise ValueError(f"unknown low-pass kind {kind!r}; valid kinds: {list(LOW_PASS_KINDS)}")
    cutoff = float(cutoff)
    if not cutoff > 0:  # also rejects NaN
        raise ValueError(f"cutoff must be > 0 cycles per image (inf = unfiltered), got {cutoff}")
    if kind == "butterworth" and (int(order) != order or order < 1):
        raise ValueError(f"butterworth order must be an integer >= 1, got {order!r}")
    return cutoff


@lru_cache(maxsize=64)
def _forgrad_mask_np(height: int, width: int, sigma: float) -> np.ndarray:
    """Xplique's disk: ``dist <= sigma`` around ``(H // 2, W // 2)`` on the unshifted grid,
    ``fftshift``-ed, half plane ``[:, : W // 2 + 1]``."""
    short = min(height, width)
    y = (np.arange(height) - height // 2) * (short / height)
    x = (np.arange(width) - width // 2) * (short / width)
    dist = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    mask = np.fft.fftshift(dist <= sigma)
    return np.ascontiguousarray(mask[:, : width // 2 + 1])


@lru_cache(maxsize=64)
def _radius_np(height: int, width: int) -> np.ndarray:
    """Radius in cycles per image (shorter side) of every ``rfft2`` coefficient, (H, W//2+1)."""
    short = min(height, width)
    ky = signed_index(height).astype(np.float64)[:, None] * (short / height)
    kx = np.arange(width // 2 + 1, dtype=np.float64)[None, :] * (short / width)
    return np.sqrt(ky**2 + kx**2)


def transfer_function(
    height: int, width: int, cutoff: float, kind: str = "ideal", order: int = 2
) -> np.ndarray:
    """The filter's gain on each ``rfft2`` coefficient, (H, W // 2 + 1) float64 (for ``forgrad``
    the binary disk with Xplique's placement)."""
    cutoff = _check(kind, cutoff, order)
    if math.isinf(cutoff):
        return np.ones((height, width // 2 + 1))
    if kind == "forgrad":
        return _forgrad_mask_np(height, width, cutoff).astype(np.float64)
    r = _radius_np(height, width)
    if kind == "ideal":
        return (r <= cutoff).astype(np.float64)
    if kind == "gaussian":
        return np.exp(-(r**2) / (2.0 * cutoff**2))
    return 1.0 / (1.0 + (r / cutoff) ** (2 * int(order)))


@lru_cache(maxsize=64)
def _transfer_tensor(height, width, cutoffs, kind, order, device, dtype) -> Tensor:
    stack = np.stack([transfer_function(height, width, c, kind, order) for c in cutoffs])
    return torch.from_numpy(stack).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _tf_bicubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n_out, 4) and weights (n_out, 4) of TensorFlow's half-pixel bicubic resize along
    one axis (``resize_bicubic`` with ``half_pixel_centers=True``), in float32 like TF."""
    a = np.float32(-0.5)
    table_size = 1024
    xs = (np.arange(table_size + 1, dtype=np.float32) / np.float32(table_size)).astype(np.float32)
    near = ((a + 2) * xs - (a + 3)) * xs * xs + 1  # |x| <= 1
    x1 = xs + np.float32(1.0)
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a  # 1 < |x| < 2
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.zeros((n_out, 4), dtype=np.int64)
    weight = np.zeros((n_out, 4), dtype=np.float32)
    for j in range(n_out):
        loc_f = (np.float32(j) + np.float32(0.5)) * scale - np.float32(0.5)
        loc = int(np.floor(loc_f))
        offset = int(np.rint(np.float32(loc_f - np.float32(loc)) * np.float32(table_size)))
        taps = (loc - 1, loc, loc + 1, loc + 2)
        w = (far[offset], near[offset], near[table_size - offset], far[table_size - offset])
        for t, (pos, wt) in enumerate(zip(taps, w)):
            inside = 0 <= pos < n_in
            index[j, t] = min(max(pos, 0), n_in - 1)
            weight[j, t] = wt if inside else np.float32(0.0)
        total = weight[j].sum(dtype=np.float32)
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            weight[j] = weight[j] * (np.float32(1.0) / total)
    return index, weight


def _resize_width_tf_bicubic(maps: Tensor, width: int) -> Tensor:
    """Resize the last axis to ``width``; the height is unchanged (a half-pixel bicubic resize
    to the same length is the identity), so only the width is resampled."""
    index, weight = _tf_bicubic_taps(maps.shape[-1], width)
    idx = torch.from_numpy(index).to(maps.device)
    wts = torch.from_numpy(weight).to(maps.device, maps.dtype)
    return (maps[..., idx] * wts).sum(-1)


@lru_cache(maxsize=64)
def _mask_support(height: int, width: int, cutoffs: tuple[float, ...]) -> tuple[int, ...]:
    """For each FORGrad disk, how many leading ``rfft2`` columns hold a non-zero coefficient."""
    out = []
    for c in cutoffs:
        cols = np.flatnonzero(_forgrad_mask_np(height, width, c).any(axis=0))
        out.append(int(cols.max()) + 1 if cols.size else 0)
    return tuple(out)


def _forgrad_apply(coef: Tensor, masks: Tensor, supports: Sequence[int], width: int) -> Tensor:
    """``abs(irfft2(coef * mask))`` (default output length) for each mask, then the TF bicubic
    back to ``width`` when an odd width lost a column: coef (N, H, Wr), masks (K, H, Wr) ->
    (N, K, H, W). Equal to ``irfft2`` but ~3x cheaper on CPU (measured at 32 and 224 px): the
    inverse along y runs only on the columns the disk reaches (the rest are zero), on contiguous
    memory; the inverse along x zero-pads the missing columns itself."""
    n, height, _ = coef.shape
    n_out = 2 * (width // 2)
    real = coef.real.dtype
    out = torch.zeros((n, len(supports), height, n_out), dtype=real, device=coef.device)
    for k, cols in enumerate(supports):
        if cols == 0:
            continue  # the disk holds no coefficient of the half plane: the map is filtered to 0
        z = (coef[..., :cols] * masks[k, :, :cols]).transpose(-1, -2).contiguous()
        y = torch.fft.ifft(z, dim=-1).transpose(-1, -2)
        out[:, k] = torch.fft.irfft(y, n=n_out, dim=-1)
    out = out.abs()
    if n_out != width:
        out = _resize_width_tf_bicubic(out, width)
    return out


def low_pass(maps: Tensor, cutoff: float, kind: str = "forgrad", order: int = 2) -> Tensor:
    """Low-pass filtered maps (N, H, W) from maps (N, H, W) or (N, C, H, W) (channels averaged).

    ``cutoff``: sigma in cycles per image (shorter side); inf = unfiltered. ``kind``: forgrad
    (Xplique's definition, absolute values), ideal, gaussian or butterworth (signed); ``order``
    is the Butterworth order. Batched on the maps' device; float32 unless float64 is given."""
    cutoff = _check(kind, cutoff, order)
    x = as_maps(maps, allow_channels=True)
    if kind == "forgrad":
        x = x.abs()
    if math.isinf(cutoff):
        return x.clone()
    _, height, width = x.shape
    gain = _transfer_tensor(height, width, (cutoff,), kind, int(order), str(x.device), x.dtype)[0]
    coef = torch.fft.rfft2(x)
    if kind == "forgrad":
        return _forgrad_apply(coef, gain[None], _mask_support(height, width, (cutoff,)), width)[:, 0]
    return torch.fft.irfft2(coef * gain, s=(height, width))


def cutoff_sweep_spectra(
    maps: Tensor,
    cutoffs: Sequence[float],
    kind: str = "forgrad",
    order: int = 2,
    max_elements: int = 1 << 25,
) -> tuple[Tensor, Tensor]:
    """Radial spectra (N, K, F) of ``low_pass(maps, c, kind)`` for every c in ``cutoffs`` (inf
    allowed: unfiltered), equal to calling ``radial_spectrum(low_pass(...))`` K times but batched:
    one forward FFT per map; for the linear kinds no inverse FFT at all (the filtered power is
    ``|gain|^2 |F|^2``); for forgrad the filtered maps are made in chunks of at most
    ``max_elements`` values. Returns (frequencies (F,), spectra (N, K, F))."""
    cutoffs = tuple(_check(kind, c, order) for c in cutoffs)
    x = as_maps(maps, allow_channels=True)
    if kind == "forgrad":
        x = x.abs()
    n, height, width = x.shape
    freqs = torch.from_numpy(radial_frequencies(height, width)).to(x.device, x.dtype)
    out = torch.empty((n, len(cutoffs), freqs.numel()), dtype=x.dtype, device=x.device)
    if kind != "forgrad" or not cutoffs:
        power = half_plane_power(x)
        gains = _transfer_tensor(height, width, cutoffs, kind, int(order), str(x.device), x.dtype)
        out[:] = power_to_profile(power[:, None] * gains.square(), height, width)
        return freqs, out
    # A disk holding every coefficient changes nothing when the width is even (no column is
    # dropped): irfft2(rfft2(|x|)) = |x|. Those cutoffs (sigma >= the corner radius, e.g. 224 and
    # 200 at 224 px) share the unfiltered spectrum of |x| instead of two FFTs each.
    identity = [k for k, c in enumerate(cutoffs)
                if math.isinf(c) or (width % 2 == 0 and _forgrad_mask_np(height, width, c).all())]
    finite = [k for k in range(len(cutoffs)) if k not in identity]
    coef = torch.fft.rfft2(x)
    if identity:
        out[:, identity] = power_to_profile(coef.real.square() + coef.imag.square(), height, width)[:, None]
    if finite:
        finite_cutoffs = tuple(cutoffs[k] for k in finite)
        masks = _transfer_tensor(height, width, finite_cutoffs, kind, 2, str(x.device), x.dtype)
        supports = _mask_support(height, width, finite_cutoffs)
        step = max(1, max_elements // max(1, n * height * width))
        for start in range(0, len(finite), step):
            sl = slice(start, start + step)
            filtered = _forgrad_apply(coef, masks[sl], supports[sl], width)
            out[:, finite[sl]] = power_to_profile(half_plane_power(filtered), height, width)
    return freqs, out


def spectra_by_cutoff(
    maps: Tensor, cutoffs: Sequence[float], kind: str = "forgrad", order: int = 2
) -> tuple[Tensor, Tensor]:
    """The spectra the store holds for a batch of maps: (frequencies (F,), spectra (N, K, F)),
    where a cutoff of +inf gives the spectrum of the map as it is (no filter, and, unlike
    ``cutoff_sweep_spectra`` for FORGrad, no absolute value) and every finite cutoff that of
    ``low_pass(maps, c, kind)``. The attribution workers write these; the aggregation recomputes
    them the same way for a store written without spectra."""
    x = as_maps(maps, allow_channels=True)
    freqs, raw = radial_spectrum(x)
    out = torch.empty((x.shape[0], len(cutoffs), freqs.numel()), dtype=raw.dtype, device=raw.device)
    unfiltered = [k for k, c in enumerate(cutoffs) if math.isinf(c)]
    finite = [k for k, c in enumerate(cutoffs) if not math.isinf(c)]
    out[:, unfiltered] = raw[:, None]
    if finite:
        out[:, finite] = cutoff_sweep_spectra(x, [cutoffs[k] for k in finite], kind=kind, order=order)[1]
    return freqs, out
