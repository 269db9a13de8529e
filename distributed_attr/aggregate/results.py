"""What the aggregation derives, typed: one ``ScopeResult`` per method and scope (all images, or
the images of one target class), built by the driver from the merged statistics and written by
``outputs`` as the store's ``aggregates/`` group, Parquet tables and plots."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from .stats import MomentsResult


@dataclass(frozen=True)
class ScopeResult:
    """One method over one scope. Arrays lead with the cutoff axis (entry 0: unfiltered)."""

    #: images in the scope
    n: int
    #: radial power spectra (cutoff, frequency): mean, std, 95% CI half-width, count
    spectrum: MomentsResult
    #: log-log slope and log10 intercept of the mean spectrum (cutoff,)
    slope: np.ndarray
    intercept: np.ndarray
    #: energy share above the high-frequency cutoff in the mean spectrum (cutoff,)
    hf_fraction: np.ndarray
    #: moments over images of each image's own slope and high-frequency fraction (cutoff,), and of
    #: the fraction the workers stored; None when the job did not compute them
    image_slope: MomentsResult | None = None
    image_hf_fraction: MomentsResult | None = None
    stored_hf_fraction: MomentsResult | None = None
    #: moments of the maps themselves (y, x); None unless the maps were read
    map: MomentsResult | None = None

    #: the optional per-image quantities, in the order of the tables' columns
    PER_IMAGE: ClassVar[tuple[str, ...]] = ("image_slope", "image_hf_fraction", "stored_hf_fraction")


#: "all", or a target class
Scope = Union[str, int]
#: method -> scope -> result
Results = dict[str, dict[Scope, ScopeResult]]
