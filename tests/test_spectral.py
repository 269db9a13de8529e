"""Closed-form checks of the radial spectrum and the low-pass filters, and FORGrad against a
NumPy transcription of Xplique's definition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distributed_attr.spectral import (
    REFERENCE_SWEEP,
    cutoff_sweep_spectra,
    high_frequency_fraction,
    low_pass,
    radial_bin_counts,
    radial_frequencies,
    radial_spectrum,
    scaled_cutoffs,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("shape", [(32, 32), (33, 33), (20, 31), (17, 8)])
def test_parseval_sum_of_power_times_count_is_sum_of_squares(shape):
    maps = torch.from_numpy(_rng(1).normal(size=(3, *shape)) + 0.3)
    freqs, profile = radial_spectrum(maps)
    counts = radial_bin_counts(*shape)
    assert counts.sum() == shape[0] * shape[1]
    assert (counts > 0).all()  # every bin holds coefficients
    assert freqs.shape == profile.shape[1:] == (max(shape) // 2 + 1,)
    np.testing.assert_allclose(freqs.numpy(), radial_frequencies(*shape))
    assert freqs[0] == 0 and freqs[-1] <= 0.5
    energy = (profile.numpy() * counts).sum(axis=1)
    np.testing.assert_allclose(energy, (maps.numpy() ** 2).sum(axis=(1, 2)), rtol=1e-10)
    # bin 0 is the mean alone: its power is H W mean^2
    np.testing.assert_allclose(profile[:, 0].numpy(), maps.numpy().mean(axis=(1, 2)) ** 2 * shape[0] * shape[1], rtol=1e-10)


@pytest.mark.parametrize(
    "shape, ky, kx, expected_bin",
    [((64, 64), 3, 4, 5), ((64, 64), 0, 9, 9), ((32, 64), 2, 0, 4), ((48, 40), 5, 12, 15)],
)
def test_sinusoid_peaks_in_its_bin(shape, ky, kx, expected_bin):
    h, w = shape
    y, x = np.mgrid[:h, :w]
    # radial frequency in cycles per pixel, and its bin for bins of width 1/max(h, w)
    r = math.hypot(ky / h, kx / w)
    assert round(r * max(h, w)) == expected_bin
    wave = np.cos(2 * np.pi * (ky * y / h + kx * x / w) + 0.7)
    freqs, profile = radial_spectrum(torch.from_numpy(wave[None]))
    profile = profile[0].numpy()
    assert int(np.argmax(profile)) == expected_bin
    assert freqs[expected_bin].item() == pytest.approx(expected_bin / max(h, w))
    energy = profile * radial_bin_counts(h, w)
    assert energy[expected_bin] == pytest.approx((wave**2).sum(), rel=1e-9)
    assert np.delete(energy, expected_bin).max() < 1e-9 * energy[expected_bin]
    # all of it is above a cutoff below r, none above a cutoff above r
    assert high_frequency_fraction(torch.from_numpy(wave[None]), r - 0.01).item() == pytest.approx(1.0)
    assert high_frequency_fraction(torch.from_numpy(wave[None]), r + 0.01).item() == pytest.approx(0.0, abs=1e-12)


def test_white_noise_profile_is_flat_at_the_variance():
    sigma = 1.7
    noise = torch.from_numpy(_rng(2).normal(scale=sigma, size=(200, 64, 64)))
    _, profile = radial_spectrum(noise)
    mean = profile.mean(0).numpy()
    # E|F(k)|^2 / (H W) = sigma^2 for every k; the sparsest bin (1) holds 4 independent
    # coefficients x 200 maps -> relative std ~ 1 / sqrt(800) = 3.5 %
    np.testing.assert_allclose(mean, sigma**2, rtol=0.15)
    assert abs(mean[5:].mean() / sigma**2 - 1) < 0.02


def test_hf_fraction_of_constant_is_zero_and_nan_propagates():
    maps = torch.ones(2, 16, 16)
    maps[1] = float("nan")
    hf = high_frequency_fraction(maps, 0.1)
    assert hf[0].item() == 0.0 and math.isnan(hf[1].item())


def _radius_cycles_per_image(n):
    k = np.fft.fftfreq(n) * n  # signed integer indices
    return np.sqrt(k[:, None] ** 2 + k[None, : n // 2 + 1] ** 2)


@pytest.mark.parametrize("n", [32, 33])
def test_ideal_filter_keeps_below_cutoff_and_removes_above(n):
    cutoff = 5.5  # not on a ring of integer radius
    maps = torch.from_numpy(_rng(3).normal(size=(4, n, n)))
    out = low_pass(maps, cutoff, kind="ideal")
    assert out.shape == maps.shape and out.dtype == torch.float64
    before = np.fft.rfft2(maps.numpy())
    after = np.fft.rfft2(out.numpy())
    keep = _radius_cycles_per_image(n) <= cutoff
    np.testing.assert_allclose(after[:, keep], before[:, keep], atol=1e-10)
    assert np.abs(after[:, ~keep]).max() < 1e-10
    # on the radial profile: bins entirely below 5.5 cycles/image unchanged, the rest empty
    _, p_before = radial_spectrum(maps)
    _, p_after = radial_spectrum(out)
    np.testing.assert_allclose(p_after[:, :6].numpy(), p_before[:, :6].numpy(), rtol=1e-9)
    assert p_after[:, 6:].abs().max().item() < 1e-20


def _keys_cubic(t, a=-0.5):
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _tf_bicubic_width(img, width):
    """TensorFlow's tf.image.resize(method="bicubic") along the last axis, as documented in its
    kernel: half-pixel centres, Keys a = -0.5 with the offset quantised to 1/1024, taps outside
    the image weighted 0, weights renormalised."""
    n_in = img.shape[-1]
    out = np.zeros(img.shape[:-1] + (width,))
    for j in range(width):
        loc = (j + 0.5) * n_in / width - 0.5
        base = math.floor(loc)
        delta = round((loc - base) * 1024) / 1024
        taps = [(base + t, _keys_cubic(t - delta)) for t in (-1, 0, 1, 2)]
        taps = [(p, w) for p, w in taps if 0 <= p < n_in]
        total = sum(w for _, w in taps)
        for p, w in taps:
            out[..., j] += img[..., p] * w / total
    return out


def _forgrad_numpy(explanations, sigma):
    """Xplique's forgrad transcribed: channel mean (our channels are axis 1), abs, rfft2, disk on
    the centred grid fftshift-ed, half plane, irfft2 (default length), abs, bicubic if odd."""
    e = np.asarray(explanations, dtype=np.float64)
    if e.ndim == 4:
        e = e.mean(axis=1)
    e = np.abs(e)
    size = e.shape[1]
    center = (size // 2, size // 2)
    y_grid, x_grid = np.ogrid[:size, :size]
    dist = np.sqrt((x_grid - center[0]) ** 2 + (y_grid - center[1]) ** 2)
    mask = np.fft.fftshift(dist <= sigma)[:, : size // 2 + 1]
    out = np.abs(np.fft.irfft2(np.fft.rfft2(e) * mask))
    if size % 2 == 1:
        out = _tf_bicubic_width(out, size)
    return out


@pytest.mark.parametrize("n, channels", [(32, None), (33, None), (32, 3), (15, 3)])
@pytest.mark.parametrize("sigma", [2.14, 7, 15])
def test_forgrad_matches_numpy_transcription(n, channels, sigma):
    shape = (3, n, n) if channels is None else (3, channels, n, n)
    maps = _rng(4).normal(size=shape).astype(np.float32)
    out = low_pass(torch.from_numpy(maps), sigma, kind="forgrad")
    ref = _forgrad_numpy(maps, sigma)
    assert out.shape == (3, n, n)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_forgrad_odd_size_disk_is_centred_on_minus_one():
    # the quirk we reproduce: at odd sizes fftshift puts the disk's centre at index n-1, so a
    # disk of radius 1 keeps frequency -1 on both axes but not the mean (distance sqrt 2)
    n = 9
    x = torch.zeros(1, n, n)
    x[0, 0, 0] = 1.0  # |x| has a flat spectrum: every coefficient is 1
    out = low_pass(x, 1.0, kind="forgrad")
    ref = _forgrad_numpy(x.numpy(), 1.0)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)


def test_gaussian_and_butterworth_gain_at_the_cutoff():
    n, sigma = 64, 6.0
    y, x = np.mgrid[:n, :n]
    wave = torch.from_numpy(np.cos(2 * np.pi * 6 * x / n)[None])  # radius exactly sigma
    g = low_pass(wave, sigma, kind="gaussian")
    b = low_pass(wave, sigma, kind="butterworth", order=3)
    np.testing.assert_allclose(g.numpy(), wave.numpy() * math.exp(-0.5), atol=1e-12)
    np.testing.assert_allclose(b.numpy(), wave.numpy() * 0.5, atol=1e-12)
    # a long wavelength passes the Butterworth almost untouched, a short one almost not at all
    low = torch.from_numpy(np.cos(2 * np.pi * 1 * x / n)[None])
    high = torch.from_numpy(np.cos(2 * np.pi * 24 * x / n)[None])
    assert low_pass(low, sigma, "butterworth", 3).numpy() == pytest.approx(low.numpy() / (1 + (1 / 6) ** 6), abs=1e-12)
    assert np.abs(low_pass(high, sigma, "butterworth", 3).numpy()).max() < 1 / (4**6)


def test_infinite_cutoff_is_unfiltered_and_errors_name_the_problem():
    maps = torch.randn(2, 3, 8, 8)
    assert torch.equal(low_pass(maps, math.inf, "ideal"), maps.mean(1))
    assert torch.equal(low_pass(maps, math.inf, "forgrad"), maps.mean(1).abs())
    with pytest.raises(ValueError, match="valid kinds.*forgrad"):
        low_pass(maps, 3, kind="box")
    with pytest.raises(ValueError, match="cutoff"):
        low_pass(maps, 0)
    with pytest.raises(ValueError, match="order"):
        low_pass(maps, 3, "butterworth", order=0)


@pytest.mark.parametrize("kind", ["forgrad", "ideal", "gaussian", "butterworth"])
@pytest.mark.parametrize("n", [16, 17])
def test_cutoff_sweep_equals_filter_then_spectrum(kind, n):
    maps = torch.from_numpy(_rng(5).normal(size=(3, n, n)))
    cutoffs = [math.inf, 12.0, 8.0, 3.0, 1.5]  # 12: the disk holds every coefficient
    freqs, sweep = cutoff_sweep_spectra(maps, cutoffs, kind=kind, max_elements=2 * n * n * 3)
    assert sweep.shape == (3, 5, n // 2 + 1)
    for k, c in enumerate(cutoffs):
        _, ref = radial_spectrum(low_pass(maps, c, kind=kind))
        np.testing.assert_allclose(sweep[:, k].numpy(), ref.numpy(), rtol=1e-7, atol=1e-12)


def test_scaled_cutoffs():
    assert REFERENCE_SWEEP == (224, 200, 125, 100, 50, 30, 20, 15, 7, 4)
    assert scaled_cutoffs(REFERENCE_SWEEP, 224) == [float(s) for s in REFERENCE_SWEEP]
    scaled = scaled_cutoffs(REFERENCE_SWEEP, 32)
    assert scaled[7] == pytest.approx(15 * 32 / 224)
    # equal cycles per pixel at both sizes
    assert scaled[7] / 32 == pytest.approx(15 / 224)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_numbers_on_gpu():
    maps = torch.randn(4, 3, 33, 33)
    for kind in ("forgrad", "ideal", "gaussian", "butterworth"):
        cpu = low_pass(maps, 5, kind)
        gpu = low_pass(maps.cuda(), 5, kind).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)
    f1, p1 = radial_spectrum(maps[:, 0])
    f2, p2 = radial_spectrum(maps[:, 0].cuda())
    torch.testing.assert_close(p2.cpu(), p1, rtol=1e-4, atol=1e-6)


def test_hf_fraction_of_a_map_filtered_to_its_mean_is_zero():
    maps = torch.rand(3, 16, 16)
    flat = low_pass(maps, 0.5, "forgrad")  # the disk holds only the mean: a constant map
    torch.testing.assert_close(flat, maps.mean((1, 2), keepdim=True).expand_as(flat), rtol=1e-5, atol=1e-6)
    # its non-DC energy is float rounding (~1e-14 of the total), not high-frequency content
    assert (high_frequency_fraction(flat, 0.1) == 0).all()
