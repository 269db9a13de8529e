"""Map-only metrics: sparseness (Chalasani et al. 2020) and complexity (Bhatt et al. 2020), as
Quantus 0.6 defines them, per image.

Both look at a = |map| normalised by its maximum (Quantus's ``abs=True, normalise=True``
defaults). Quantus normalises by the maximum over the whole batch it is given; we normalise each
image by its own maximum, so a score does not depend on the other images of the batch (Quantus
called one image at a time gives our numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Metric, MetricContext, register


def _normalised_magnitude(maps: Tensor) -> Tensor:
    """|map| / max |map| per image, float64, (N, H*W); all-zero maps stay zero."""
    a = maps.detach().double().abs().reshape(maps.shape[0], -1)
    peak = a.amax(dim=1, keepdim=True)
    return torch.where(peak > 0, a / torch.where(peak > 0, peak, torch.ones_like(peak)), a)


def gini(maps: Tensor) -> Tensor:
    """Gini index of |map| (N,): 0 for a uniform map, towards 1 when one pixel holds everything.
    1e-7 is added to every value first, as Quantus does, so an all-zero map scores 0."""
    a = _normalised_magnitude(maps) + 1e-7
    a, _ = torch.sort(a, dim=1)
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=a.dtype, device=a.device)
    return ((2 * i - n - 1) * a).sum(1) / (n * a.sum(1))


def entropy(maps: Tensor) -> Tensor:
    """Shannon entropy (nats) of |map| / sum |map| (N,): log(H*W) for a uniform map, 0 for one
    pixel. An all-zero map counts as uniform (Quantus returns NaN there)."""
    a = _normalised_magnitude(maps)
    total = a.sum(1, keepdim=True)
    p = torch.where(total > 0, a / torch.where(total > 0, total, torch.ones_like(total)),
                    torch.full_like(a, 1.0 / a.shape[1]))
    return -(p * torch.log(p + 1e-12)).sum(1)


@register
class Sparseness(Metric):
    """Gini index of the map's magnitude (higher = sparser, better)."""

    name = "sparseness"
    higher_is_better = True
    score_output = "gini"
    needs_model = False

    @dataclass
    class Params:
        pass

    def outputs(self, ctx: MetricContext):
        return {"gini": ((), ())}

    def evaluate(self, model, x, maps, target, ctx):
        return {"gini": gini(maps).float()}


@register
class Complexity(Metric):
    """Entropy of the map's normalised magnitude (lower = less complex, better)."""

    name = "complexity"
    higher_is_better = False
    score_output = "entropy"
    needs_model = False

    @dataclass
    class Params:
        #: divide by log(H*W) so that the score lies in [0, 1] whatever the image size
        normalise: bool = False

    def outputs(self, ctx: MetricContext):
        return {"entropy": ((), ())}

    def evaluate(self, model, x, maps, target, ctx):
        e = entropy(maps)
        if self.params.normalise:
            e = e / math.log(max(2, maps.shape[-1] * maps.shape[-2]))
        return {"entropy": e.float()}
