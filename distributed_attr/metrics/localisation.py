"""Localisation metrics: does the map put its relevance on the ground-truth object? Quantus 0.6's
definitions and defaults, per image, batched over the image axis, from ``ctx.masks`` (N, H, W).

Every metric first divides each map by its own maximum magnitude (Quantus's default
``normalise=True`` with ``normalise_by_max``; an all-zero map is left as it is), then takes the
absolute value when ``abs`` is set (Quantus's order). Quantus normalises by the maximum of the
whole batch it is given; all scores here are invariant to a positive scale of the map except
``attribution_localisation`` through its ``1e-9``, so the difference only shows there, at the
1e-9 level. With a = the map so prepared, s = the mask, K = |s| (pixels in the mask), F = H*W:

* ``pointing_game`` (Zhang et al. 2018): 1 when the maximum of a lies in s.
* ``attribution_localisation`` (Kohlbrenner et al. 2020): sum(a s) / (sum(a) + 1e-9).
* ``top_k_intersection`` (Theiner et al. 2021): |top-k pixels of a  and  s| / k.
* ``relevance_mass_accuracy`` (Arras et al. 2022): sum(a s) / sum(a).
* ``relevance_rank_accuracy`` (Arras et al. 2022): |top-K pixels of a  and  s| / K.
* ``auc`` (Fawcett 2006): ROC AUC of a as a score for the labels s.

Quantus conventions followed, although surprising:

* ``abs`` defaults differ between metrics (True for attribution_localisation only), so signed maps
  are used as they are by the other five; ``relevance_mass_accuracy`` with a signed map is a ratio
  of signed sums, not bounded to [0, 1] and unbounded when sum(a) is near 0 (Quantus's docstring
  speaks of positive attributions, its code does not clip). ``positive_attributions=True`` clips
  negatives first (Arras et al.'s and Kohlbrenner et al.'s positive relevance).
* An empty mask gives NaN (nothing to localise). A mask covering the whole image gives NaN for
  ``auc`` (no negative pixel: the ROC curve is undefined, as in scikit-learn).
* ``attribution_localisation`` returns NaN when its ratio exceeds 1 (only possible with negative
  values, i.e. ``abs=False``); ``relevance_mass_accuracy`` divides without epsilon (0/0 = NaN).
* ``top_k_intersection``'s ``k`` is a pixel count (1000, about 2% of 224 x 224); it must not
  exceed H*W (Quantus refuses k >= H*W; k = H*W is allowed here).

Where we differ from Quantus, and why:

* **Ties.** Quantus ranks with ``np.argsort(-a)``, whose order among equal values depends on
  NumPy's sort implementation (index order for small arrays), so a map with plateaus (Occlusion
  patches, a flat or all-zero map) scores by where the object lies in raster order; the pointing
  game counts a hit when *any* maximal pixel is in the mask, so a flat map (an all-zero Grad-CAM)
  scores a hit on every image. Here every rank-based score is its expected value when ties are
  broken uniformly at random: the pointing game scores the fraction of maximal pixels that lie in
  the mask, top-k and rank accuracy count the tied group that straddles the cut-off
  proportionally, and the AUC gives ties half credit (as scikit-learn). A flat map therefore
  scores chance (K/F) instead of 1, and the numbers equal Quantus's whenever the maximum, or the
  k-th value, is not tied.
* **Empty mask in the pointing game.** Quantus assigns NaN into a boolean array, which stores
  True: an empty mask counts as a hit. Here it is NaN, as Quantus intends and does for the
  other five metrics.
* **weighted.** Quantus's ``weighted=True`` is broken in both metrics that have it (the pointing
  game writes the weights into a boolean array, and fails for more than one hit;
  attribution_localisation divides by the size of ``x_batch[2:]``, images 2.. of the batch,
  instead of one image): not offered.
* **tolerance** (pointing game, not in Quantus, default 0 = Quantus): Zhang et al. count a hit
  when the maximum lies within ``tolerance`` pixels (Euclidean) of the object (15 px in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Metric, MetricContext, average_ranks, register


def prepared_maps(maps: Tensor, abs: bool, positive: bool = False) -> Tensor:
    """(N, H*W) float64: each map divided by its maximum magnitude (all-zero maps kept), then
    |a| when ``abs``, then negatives clipped to 0 when ``positive``."""
    a = maps.detach().double().reshape(maps.shape[0], -1)
    peak = a.abs().amax(dim=1, keepdim=True)
    a = torch.where(peak > 0, a / torch.where(peak > 0, peak, torch.ones_like(peak)), a)
    if abs:
        a = a.abs()
    if positive:
        a = a.clamp_min(0.0)
    return a


def expected_top_k_hits(a: Tensor, s: Tensor, k: Tensor) -> Tensor:
    """Expected number of mask pixels among the ``k`` (N,) highest values of ``a`` (N, F), ties
    broken uniformly at random: pixels above the k-th value count fully, the group tied with it
    counts in proportion to the places left (k >= 1). NaN values rank last."""
    a = torch.where(torch.isnan(a), torch.full_like(a, float("-inf")), a)
    f = a.shape[1]
    kth = torch.sort(a, dim=1, descending=True).values.gather(1, (k - 1).clamp(0, f - 1).view(-1, 1))
    above, tied = a > kth, a == kth
    n_above, n_tied = above.sum(1).double(), tied.sum(1).double()
    hits_above, hits_tied = (above & s).sum(1).double(), (tied & s).sum(1).double()
    return hits_above + (k.double() - n_above) * hits_tied / n_tied


def roc_auc(a: Tensor, s: Tensor) -> Tensor:
    """ROC AUC of scores ``a`` (N, F) for labels ``s`` (N, F), ties counting half (the
    Mann-Whitney U statistic, equal to scikit-learn's trapezoid ROC area); NaN when s is all
    False or all True."""
    ranks = average_ranks(a)
    pos = s.sum(1).double()
    neg = s.shape[1] - pos
    u = (ranks * s).sum(1) - pos * (pos + 1) / 2
    den = pos * neg
    return torch.where(den > 0, u / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def _nan_where(values: Tensor, condition: Tensor) -> Tensor:
    return torch.where(condition, torch.full_like(values, float("nan")), values)


class _Localisation(Metric):
    """Shared checks: masks present, shaped like the maps."""

    needs_model = False
    needs_masks = True
    higher_is_better = True

    def outputs(self, ctx: MetricContext):
        return {self.score_output: ((), ())}

    def masks(self, maps: Tensor, ctx: MetricContext) -> Tensor:
        """``ctx.masks`` as (N, H*W) bool on the maps' device, or a clear error."""
        if ctx.masks is None:
            raise ValueError(
                f"metric {self.name!r} needs ground-truth masks, and this batch has none (ctx.masks is None): "
                "the data needs a mask column (data.mask_column)"
            )
        masks = torch.as_tensor(ctx.masks)
        if masks.shape != maps.shape:
            raise ValueError(
                f"metric {self.name!r}: ground-truth masks must have the maps' shape (N, H, W) = "
                f"{tuple(maps.shape)}, got {tuple(masks.shape)}"
            )
        masks = masks.to(maps.device)
        masks = masks if masks.dtype == torch.bool else masks != 0
        return masks.reshape(masks.shape[0], -1)

    def evaluate(self, model, x, maps, target, ctx):
        s = self.masks(maps, ctx)
        score = self.score(maps, s)
        return {self.score_output: _nan_where(score, s.sum(1) == 0).float()}

    def score(self, maps: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError


@register
class PointingGame(_Localisation):
    """Whether the map's maximum lies on the object (Zhang et al. 2018; Quantus PointingGame)."""

    name = "pointing_game"
    score_output = "hit"

    @dataclass
    class Params:
        #: rank |map| instead of the signed map (Quantus: False)
        abs: bool = False
        #: a maximum within this many pixels (Euclidean) of the mask is a hit (Zhang et al.: 15;
        #: Quantus: none, 0)
        tolerance: int = 0

        def validate(self) -> None:
            if self.tolerance < 0:
                raise ValueError("tolerance must be >= 0")

    def score(self, maps, s):
        a = prepared_maps(maps, self.params.abs)
        r = self.params.tolerance
        if r > 0:
            n, h, w = maps.shape
            d = torch.arange(-r, r + 1, device=maps.device, dtype=torch.float32)
            disk = ((d.view(-1, 1) ** 2 + d.view(1, -1) ** 2) <= r * r).float().view(1, 1, 2 * r + 1, 2 * r + 1)
            near = F.conv2d(s.float().view(n, 1, h, w), disk, padding=r) > 0.5
            s = near.reshape(n, -1)
        peak = a == a.amax(dim=1, keepdim=True)
        # the fraction of maximal pixels on the object: 0 or 1 for a unique maximum (Quantus's
        # hit), chance for a flat map (Quantus: any maximal pixel on the object is a hit)
        return (peak & s).sum(1).double() / peak.sum(1).double()


@register
class AttributionLocalisation(_Localisation):
    """Share of the map's mass inside the object (Kohlbrenner et al. 2020; Quantus AttributionLocalisation)."""

    name = "attribution_localisation"
    score_output = "ratio"

    @dataclass
    class Params:
        #: use |map| (Quantus: True)
        abs: bool = True
        #: clip negative values to 0 first (Quantus: False; after abs, so only with abs=False)
        positive_attributions: bool = False

    def score(self, maps, s):
        a = prepared_maps(maps, self.params.abs, self.params.positive_attributions)
        ratio = (a * s).sum(1) / (a.sum(1) + 1e-9)
        return _nan_where(ratio, ratio > 1)


@register
class TopKIntersection(_Localisation):
    """Share of the k highest-ranked pixels that lie on the object (Theiner et al. 2021; Quantus TopKIntersection)."""

    name = "top_k_intersection"
    score_output = "intersection"

    @dataclass
    class Params:
        #: pixels in the top set (Quantus: 1000); at most H*W
        k: int = 1000
        #: multiply by H*W / |mask|, so that chance is 1 whatever the object's size (Quantus: False)
        concept_influence: bool = False
        #: rank |map| (Quantus: False)
        abs: bool = False

        def validate(self) -> None:
            if self.k < 1:
                raise ValueError("k must be >= 1")

    def score(self, maps, s):
        n, f = s.shape
        if self.params.k > f:
            raise ValueError(
                f"metric {self.name!r}: k = {self.params.k} exceeds the {f} pixels of an image "
                f"({maps.shape[-2]} x {maps.shape[-1]}); set metrics.{self.name}.k <= {f}"
            )
        a = prepared_maps(maps, self.params.abs)
        k = torch.full((n,), self.params.k, dtype=torch.int64, device=a.device)
        out = expected_top_k_hits(a, s, k) / self.params.k
        if self.params.concept_influence:
            out = out * f / s.sum(1).double()
        return out


@register
class RelevanceMassAccuracy(_Localisation):
    """Share of the map's sum inside the object (Arras et al. 2022; Quantus RelevanceMassAccuracy)."""

    name = "relevance_mass_accuracy"
    score_output = "accuracy"

    @dataclass
    class Params:
        #: use |map| (Quantus: False: a signed map gives a ratio of signed sums)
        abs: bool = False
        #: clip negative values to 0 first (not in Quantus; Arras et al.'s positive relevance)
        positive_attributions: bool = False

    def score(self, maps, s):
        a = prepared_maps(maps, self.params.abs, self.params.positive_attributions)
        return (a * s).sum(1) / a.sum(1)


@register
class RelevanceRankAccuracy(_Localisation):
    """Share of the object's size K whose K highest-ranked pixels lie on it (Arras et al. 2022; Quantus RelevanceRankAccuracy)."""

    name = "relevance_rank_accuracy"
    score_output = "accuracy"

    @dataclass
    class Params:
        #: rank |map| (Quantus: False)
        abs: bool = False

    def score(self, maps, s):
        a = prepared_maps(maps, self.params.abs)
        k = s.sum(1)
        return expected_top_k_hits(a, s, k.clamp_min(1)) / k.double()


@register
class AUC(_Localisation):
    """ROC AUC of the map as a detector of the object's pixels (Fawcett 2006; Quantus AUC)."""

    name = "auc"
    score_output = "auc"

    @dataclass
    class Params:
        #: rank |map| (Quantus: False)
        abs: bool = False

    def score(self, maps, s):
        return roc_auc(prepared_maps(maps, self.params.abs), s)
