"""Fourier analysis of attribution maps: radial power spectra, high-frequency fractions,
low-pass filters (FORGrad and linear ones) and, in ``downsampling``, where a CNN's gradient
high frequencies come from. The recipe and its identities are documented in docs/spectra.md."""
from .downsampling import (
    BlurPool2d,
    antialiased,
    compare_input_gradient_spectra,
    downsampling_stages,
    stage_gradient_spectra,
)
from .filters import (
    LOW_PASS_KINDS,
    REFERENCE_SWEEP,
    cutoff_sweep_spectra,
    low_pass,
    scaled_cutoffs,
    spectra_by_cutoff,
    transfer_function,
)
from .radial import (
    high_frequency_fraction,
    high_frequency_fraction_from_spectrum,
    radial_bin_counts,
    radial_bin_index,
    radial_frequencies,
    radial_spectrum,
)

__all__ = [
    "BlurPool2d",
    "antialiased",
    "compare_input_gradient_spectra",
    "downsampling_stages",
    "stage_gradient_spectra",
    "LOW_PASS_KINDS",
    "REFERENCE_SWEEP",
    "cutoff_sweep_spectra",
    "high_frequency_fraction",
    "high_frequency_fraction_from_spectrum",
    "low_pass",
    "radial_bin_counts",
    "radial_bin_index",
    "radial_frequencies",
    "radial_spectrum",
    "scaled_cutoffs",
    "spectra_by_cutoff",
    "transfer_function",
]
