"""Robustness metrics: how much does the explanation change when the input moves a little? Max- and
Avg-Sensitivity (Yeh et al. 2019, "On the (in)fidelity and sensitivity of explanations"), as
Quantus 0.6 defines them (``MaxSensitivity``, ``AvgSensitivity``), per image.

For ``samples`` inputs x + d, d uniform in the L-inf ball of radius ``lower_bound`` (every
input element, every channel, drawn independently from [-lower_bound, lower_bound], in the
model's input space, not clipped), the explanation is recomputed with ``ctx.explain`` and

    sensitivity_s = ||a(x) - a(x + d_s)|| / ||a(x)||

with the Frobenius (L2) norm of the flattened maps by default (``norm_numerator``,
``norm_denominator``: "fro" or "linf"); ``max_sensitivity`` is the maximum over samples,
``avg_sensitivity`` the mean. Lower is better. a(x) is the map the metric is given (``maps``);
``ctx.explain`` must return maps prepared the same way (the same method and, for a filtered
variant, the same filter), or the score measures the preparation as well.

As Quantus: NaN samples (0/0, a zero map whose perturbed maps are zero too) are skipped
(``nanmax``/``nanmean``), a zero map with non-zero perturbed maps gives inf; with
``return_nan_when_prediction_changes`` a sample whose predicted class (argmax) differs from the
prediction on x is NaN and so is the image's score (plain max/mean). ``normalise`` divides each
map by its maximum magnitude and ``abs`` takes |map| (both off by default, as in Quantus);
Quantus normalises by the maximum over the whole batch it is given, we normalise each map by its
own, so a score does not depend on the other images (Quantus called one image at a time gives
our numbers). Quantus's one-sided noise (``upper_bound``), other perturbation and similarity
functions are not offered.

The noise of sample s of image i comes from a generator seeded by ``per_sample_seeds`` of the
image's own generator (seed, "sensitivity", global index): it does not depend on the batch, the
device or the chunking, and max- and avg-sensitivity with the same ``samples`` see the same
perturbed inputs (so max >= avg). The (image, sample) pairs form one flattened batch handed to
``ctx.explain`` ``ctx.max_batch`` pairs at a time (halved on CUDA out of memory). Cost per image:
``samples`` explanations (plus ``samples`` forward passes for the prediction check).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..commons import (
    autocast_ctx,
    per_image_generators,
    per_sample_seeds,
    run_in_chunks,
)
from .base import Metric, MetricContext, explain_rows, register

NOISE_KEY = "sensitivity"
Norm = Literal["fro", "linf"]


def uniform_noise(seed: int, shape, bound: float) -> Tensor:
    """Float32 draws uniform in [-bound, bound) of ``shape`` from a CPU generator seeded with ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=g, dtype=torch.float32) * (2.0 * bound) - bound


def _prepare(maps: Tensor, normalise: bool, abs: bool) -> Tensor:
    """(N, H*W) float64; divided by the maximum magnitude per map (zero maps kept) when
    ``normalise``, then |a| when ``abs`` (Quantus's order)."""
    a = maps.detach().double().reshape(maps.shape[0], -1)
    if normalise:
        peak = a.abs().amax(dim=1, keepdim=True)
        a = torch.where(peak > 0, a / torch.where(peak > 0, peak, torch.ones_like(peak)), a)
    if abs:
        a = a.abs()
    return a


def _norm(a: Tensor, kind: str) -> Tensor:
    return torch.linalg.vector_norm(a, ord=float("inf") if kind == "linf" else 2, dim=-1)


def _predictions(model, x: Tensor, ctx: MetricContext) -> Tensor:
    with torch.no_grad(), autocast_ctx(ctx, x.device):
        return model(x).float().argmax(dim=1)


class _Sensitivity(Metric):
    higher_is_better = False
    score_output = "sensitivity"
    needs_model = True
    needs_explain = True
    reduce: str = "max"

    @dataclass
    class Params:
        #: perturbed inputs per image (Quantus: nr_samples = 200; ``nr_samples`` here too before
        #: 2026-11-30, still read: the methods call their random draws ``samples``)
        samples: int = 200
        #: radius of the L-inf ball the noise is drawn from, model input space (Quantus: 0.2)
        lower_bound: float = 0.2
        #: norm of the map difference and of the map (Quantus: Frobenius for both)
        norm_numerator: Norm = "fro"
        norm_denominator: Norm = "fro"
        #: divide every map by its maximum magnitude first (Quantus: False)
        normalise: bool = False
        #: use |map| (Quantus: False)
        abs: bool = False
        #: a sample whose predicted class changes is NaN, and so is the image's score (Quantus: False)
        return_nan_when_prediction_changes: bool = False

        RENAMED: ClassVar[dict] = {"nr_samples": ("samples", None)}

        def validate(self) -> None:
            if self.samples < 1:
                raise ValueError("samples must be >= 1")
            if self.lower_bound < 0:
                raise ValueError("lower_bound must be >= 0")
            for key in ("norm_numerator", "norm_denominator"):
                if getattr(self, key) not in ("fro", "linf"):
                    raise ValueError(f"{key} {getattr(self, key)!r} is not one of ['fro', 'linf']")

    def outputs(self, ctx: MetricContext):
        return {"sensitivity": ((), ())}

    def cost(self) -> float:
        """Explanations per image (each costs what the method costs), plus the prediction check."""
        p = self.params
        return float(p.samples * (2 if p.return_nan_when_prediction_changes else 1))

    def similarities(self, model, x: Tensor, maps: Tensor, target: Tensor, ctx: MetricContext) -> Tensor:
        """(N, samples) ||a(x) - a(x + d_s)|| / ||a(x)||, NaN where the prediction changed
        (when asked)."""
        if ctx.explain is None:
            raise ValueError(
                f"metric {self.name!r} needs the explanation function of the method it evaluates "
                "(ctx.explain is None): it recomputes the maps on perturbed inputs"
            )
        p = self.params
        n, s = x.shape[0], p.samples
        if maps.shape != (n, *x.shape[2:]):
            raise ValueError(f"maps must have shape {(n, *x.shape[2:])}, got {tuple(maps.shape)}")
        seeds = per_sample_seeds(per_image_generators(ctx.seed, NOISE_KEY, ctx.indices_for(n)), s)
        a = _prepare(maps.to(x.device), p.normalise, p.abs)
        den = _norm(a, p.norm_denominator)
        target = target.to(x.device)
        check = p.return_nan_when_prediction_changes
        if check:
            if model is None:
                raise ValueError(f"metric {self.name!r}: return_nan_when_prediction_changes needs the model")
            before = run_in_chunks(lambda sl: _predictions(model, x[sl], ctx), n, ctx)
        shape = tuple(x.shape[1:])
        image_index = ctx.indices_for(n)

        def one(sl: slice) -> Tensor:
            pair = torch.arange(sl.start, sl.stop)
            img, sample = pair // s, pair % s
            noise = torch.stack([uniform_noise(seed, shape, p.lower_bound) for seed in seeds[img, sample].tolist()])
            img = img.to(x.device)
            xp = x.detach()[img] + noise.to(device=x.device, dtype=x.dtype)
            ap = explain_rows(ctx, xp, target[img], image_index[img.cpu()])
            if tuple(ap.shape) != (len(pair), *x.shape[2:]):
                raise ValueError(
                    f"ctx.explain returned maps of shape {tuple(ap.shape)} for {len(pair)} inputs of "
                    f"shape {tuple(x.shape[1:])}; expected {(len(pair), *x.shape[2:])}"
                )
            ap = _prepare(ap.to(x.device), p.normalise, p.abs)
            r = _norm(a[img] - ap, p.norm_numerator) / den[img]
            if check:
                changed = _predictions(model, xp, ctx) != before[img]
                r = torch.where(changed, torch.full_like(r, float("nan")), r)
            return r

        return run_in_chunks(one, n * s, ctx).view(n, s)

    def evaluate(self, model, x, maps, target, ctx):
        sims = self.similarities(model, x, maps, target, ctx)
        strict = self.params.return_nan_when_prediction_changes  # NaN samples poison the score
        nan = torch.isnan(sims)
        if self.reduce == "max":
            if strict:
                score = sims.amax(dim=1)
                score = torch.where(nan.any(1), torch.full_like(score, float("nan")), score)
            else:
                score = torch.where(nan, torch.full_like(sims, float("-inf")), sims).amax(dim=1)
                score = torch.where(nan.all(1), torch.full_like(score, float("nan")), score)
        else:
            score = sims.mean(dim=1) if strict else torch.nanmean(sims, dim=1)
        return {"sensitivity": score.float()}


@register
class MaxSensitivity(_Sensitivity):
    """Largest relative change of the map over inputs in an L-inf ball (Yeh et al. 2019; Quantus MaxSensitivity)."""

    name = "max_sensitivity"
    reduce = "max"


@register
class AvgSensitivity(_Sensitivity):
    """Mean relative change of the map over inputs in an L-inf ball (Yeh et al. 2019; Quantus AvgSensitivity)."""

    name = "avg_sensitivity"
    reduce = "mean"
