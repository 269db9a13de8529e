"""Deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE"), and the FORGrad protocol score.

Features (pixels or square patches) are ranked by the map; the image goes from a start image to an
end image by replacing the ``c_k = floor(k * F / steps)`` most important features, k = 0..steps,
and the explained class score is read after each step. Deletion goes from the image to a
baseline (a good map makes the score fall fast: lower AUC is better); insertion goes from a
baseline to the image (a good map makes it rise fast: higher is better). The curve keeps all
``steps + 1`` points, the AUC is the trapezoid rule on [0, 1] (Xplique's convention).

All (image, step) pairs are one flattened batch generated chunk by chunk, so the cost is
``steps + 1`` forward passes per image whatever the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .base import (
    Metric,
    MetricContext,
    baseline_images,
    OUTPUT_RENAMED,
    check_output,
    check_baseline,
    generated_scores,
    pixel_ranks,
    register,
    trapezoid_auc,
)

Order = Literal["signed", "absolute"]
Output = Literal["probability", "logit"]


def perturbation_curve(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    maps: Tensor,
    target: Tensor,
    ctx: MetricContext,
    *,
    steps: int,
    patch: int = 1,
    order: str = "signed",
    output: str = "probability",
) -> Tensor:
    """Class score after replacing, in ``start``, the top features of ``maps`` by ``end``:
    (N, steps + 1), point 0 being ``start`` itself and point ``steps`` all features replaced."""
    n, c, h, w = start.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps must have shape {(n, h, w)} to match the images, got {tuple(maps.shape)}")
    ranks, n_features = pixel_ranks(maps.to(start.device), patch, order)
    ranks = ranks.view(n, 1, h, w)
    counts = (torch.arange(steps + 1, device=start.device) * n_features) // steps
    target = target.to(start.device)
    s1 = steps + 1

    def make(idx: Tensor) -> tuple[Tensor, Tensor]:
        img, step = idx // s1, idx % s1
        replaced = ranks[img] < counts[step].view(-1, 1, 1, 1)
        return torch.where(replaced, end[img], start[img]), target[img]

    scores = generated_scores(model, n * s1, make, ctx, output, start.device)
    return scores.view(n, s1)


class _Perturbation(Metric):
    mode: str = "deletion"
    score_output = "auc"

    def outputs(self, ctx: MetricContext):
        return {"auc": ((), ()), "curve": (("step",), (self.params.steps + 1,))}

    def coords(self, ctx: MetricContext) -> dict[str, list]:
        return {"step": [k / self.params.steps for k in range(self.params.steps + 1)]}

    def cost(self) -> float:
        return float(self.params.steps + 1)

    def evaluate(self, model, x, maps, target, ctx):
        p = self.params
        base = baseline_images(x, p.baseline, ctx, p.blur_size, p.blur_sigma)
        start, end = (x, base) if self.mode == "deletion" else (base, x)
        curve = perturbation_curve(
            model, start, end, maps, target, ctx,
            steps=p.steps, patch=p.patch, order=p.order, output=p.output,
        )
        return {"auc": trapezoid_auc(curve), "curve": curve}


@dataclass
class _PerturbationParams:
    #: number of steps; the curve has steps + 1 points (Xplique: 10)
    steps: int = 10
    #: "zero" | "blur" | "mean" | a number (model input space)
    baseline: str | float = "zero"
    #: Gaussian blur kernel size and sigma for the "blur" baseline (Petsiuk et al.: 11, 5)
    blur_size: int = 11
    blur_sigma: float = 5.0
    #: feature size in pixels: 1 = pixels, p = p x p patches ranked by their mean attribution
    patch: int = 1
    #: "signed": most positive first (Xplique, Quantus); "absolute": largest magnitude first
    order: Order = "signed"
    #: the explained class's softmax "probability" (Petsiuk et al.) or raw "logit" (the methods'
    #: word; "activation: softmax|logit" before 2026-11-30)
    output: Output = "probability"

    RENAMED: ClassVar[dict] = OUTPUT_RENAMED

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.patch < 1:
            raise ValueError("patch must be >= 1")
        if self.blur_size < 1 or self.blur_size % 2 == 0:
            raise ValueError("blur_size must be a positive odd number")
        if self.blur_sigma <= 0:
            raise ValueError("blur_sigma must be > 0")
        check_baseline(self.baseline)
        check_output(self.output)


@register
class Deletion(_Perturbation):
    """Score while the most important features are replaced by a baseline (lower AUC is better)."""

    name = "deletion"
    higher_is_better = False
    mode = "deletion"

    @dataclass
    class Params(_PerturbationParams):
        baseline: str | float = "zero"


@register
class Insertion(_Perturbation):
    """Score while the most important features are put back into a baseline (higher AUC is better)."""

    name = "insertion"
    higher_is_better = True
    mode = "insertion"

    @dataclass
    class Params(_PerturbationParams):
        #: Petsiuk et al. insert into a blurred image; Xplique's default is 0
        baseline: str | float = "blur"


@register
class ForgradProtocol(Metric):
    """AUC(insertion from a blurred image) - AUC(deletion towards 0): the score FORGrad's
    follow-ups report "as in Muzellec et al." (higher is better)."""

    name = "forgrad_protocol"
    higher_is_better = True
    score_output = "score"

    @dataclass
    class Params:
        steps: int = 10
        deletion_baseline: str | float = "zero"
        insertion_baseline: str | float = "blur"
        blur_size: int = 11
        blur_sigma: float = 5.0
        patch: int = 1
        order: Order = "signed"
        output: Output = "probability"

        RENAMED: ClassVar[dict] = OUTPUT_RENAMED

        def validate(self) -> None:
            _PerturbationParams(
                steps=self.steps, baseline=self.deletion_baseline, blur_size=self.blur_size,
                blur_sigma=self.blur_sigma, patch=self.patch, order=self.order, output=self.output,
            ).validate()
            check_baseline(self.insertion_baseline)

    def outputs(self, ctx: MetricContext):
        curve = (("step",), (self.params.steps + 1,))
        return {
            "score": ((), ()),
            "insertion_auc": ((), ()),
            "deletion_auc": ((), ()),
            "insertion_curve": curve,
            "deletion_curve": curve,
        }

    def coords(self, ctx: MetricContext) -> dict[str, list]:
        return {"step": [k / self.params.steps for k in range(self.params.steps + 1)]}

    def cost(self) -> float:
        return 2.0 * (self.params.steps + 1)

    def evaluate(self, model, x, maps, target, ctx):
        p = self.params
        common = dict(steps=p.steps, patch=p.patch, order=p.order, output=p.output)
        del_base = baseline_images(x, p.deletion_baseline, ctx, p.blur_size, p.blur_sigma)
        ins_base = baseline_images(x, p.insertion_baseline, ctx, p.blur_size, p.blur_sigma)
        # One flattened batch for both curves: deletion rows first, then insertion rows.
        n = x.shape[0]
        start = torch.cat([x, ins_base])
        end = torch.cat([del_base, x])
        curves = perturbation_curve(
            model, start, end, torch.cat([maps, maps]), torch.cat([target, target]), ctx, **common
        )
        deletion, insertion = curves[:n], curves[n:]
        del_auc, ins_auc = trapezoid_auc(deletion), trapezoid_auc(insertion)
        return {
            "score": ins_auc - del_auc,
            "insertion_auc": ins_auc,
            "deletion_auc": del_auc,
            "insertion_curve": insertion,
            "deletion_curve": deletion,
        }
