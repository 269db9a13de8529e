"""MuFidelity (Bhatt, Weller & Moura 2020, "Evaluating and aggregating feature-based model
explanations", definition 3).

For random subsets S of features, the correlation over S between the attribution mass of S,
sum_{i in S} g_i, and the drop of the explained class score when S is set to a baseline,
f(x) - f(x_[S = baseline]). Features are the cells of a ``grid`` x ``grid`` partition of the image
(Xplique's super-pixels; ``grid`` = image size gives pixels). Every subset holds exactly
round(subset_fraction * grid^2) cells, drawn per image from a generator seeded by (seed, image
index), so a unit recomputed elsewhere reproduces its subsets. Higher is better; a constant side
(no variation) gives NaN, counted as 0 as in Xplique.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..commons import per_image_generators, per_image_rand
from .base import (
    Metric,
    MetricContext,
    baseline_images,
    cell_of_pixel,
    cell_sums,
    OUTPUT_RENAMED,
    check_output,
    check_baseline,
    generated_scores,
    pearson,
    register,
    spearman,
)


def subset_size(n_cells: int, fraction: float) -> int:
    return min(n_cells, max(1, int(round(fraction * n_cells))))


def random_subsets(indices: Tensor, seed: int, n_subsets: int, n_cells: int, size: int) -> Tensor:
    """(N, n_subsets, n_cells) bool, True for the ``size`` cells removed in each subset.

    Drawn on the CPU from one generator per image (seeded by the global seed and the image's
    global index) so the subsets do not depend on the device or on the batch."""
    gens = per_image_generators(seed, "mufidelity", indices)
    u = per_image_rand(gens, (n_subsets, n_cells), torch.device("cpu"))
    # the ``size`` smallest draws of each row (a partial selection: no full sort of every row)
    chosen = torch.topk(u, size, dim=-1, largest=False).indices
    return torch.zeros(u.shape, dtype=torch.bool).scatter_(-1, chosen, True)


@register
class MuFidelity(Metric):
    """Correlation between the attribution mass of random subsets and the score drop when they are removed."""

    name = "mufidelity"
    higher_is_better = True
    score_output = "correlation"

    @dataclass
    class Params:
        #: cells per side of the feature grid (Xplique: 9)
        grid: int = 9
        #: fraction of the cells removed in each subset (Xplique: 0.2)
        subset_fraction: float = 0.2
        #: subsets per image (Xplique: 200; Quantus FaithfulnessCorrelation: 100 runs)
        n_subsets: int = 128
        #: value removed cells take: a number, "zero", "blur" or "mean" (Xplique: 0)
        baseline: str | float = 0.0
        blur_size: int = 11
        blur_sigma: float = 5.0
        #: "spearman" (Xplique) or "pearson" (Quantus)
        correlation: Literal["spearman", "pearson"] = "spearman"
        #: the class score: softmax "probability" or raw "logit" (the methods' word; "activation:
        #: softmax|logit" before 2026-11-30)
        output: Literal["probability", "logit"] = "probability"

        RENAMED: ClassVar[dict] = OUTPUT_RENAMED

        def validate(self) -> None:
            if self.grid < 1:
                raise ValueError("grid must be >= 1")
            if not 0.0 < self.subset_fraction < 1.0:
                raise ValueError("subset_fraction must be in (0, 1)")
            if self.n_subsets < 2:
                raise ValueError("n_subsets must be >= 2 (a correlation needs two points)")
            check_baseline(self.baseline)
            check_output(self.output)

    def outputs(self, ctx: MetricContext):
        return {"correlation": ((), ())}

    def cost(self) -> float:
        return float(self.params.n_subsets + 1)

    def evaluate(self, model, x, maps, target, ctx):
        p = self.params
        n, c, h, w = x.shape
        dev = x.device
        target = target.to(dev)
        n_cells = p.grid * p.grid
        cell = cell_of_pixel(h, w, p.grid, p.grid, "grid", device=dev)
        removed = random_subsets(ctx.indices_for(n), ctx.seed, p.n_subsets, n_cells,
                                 subset_size(n_cells, p.subset_fraction)).to(dev)
        base = baseline_images(x, p.baseline, ctx, p.blur_size, p.blur_sigma)
        s = p.n_subsets

        clean = generated_scores(model, n, lambda idx: (x[idx], target[idx]), ctx, p.output, dev)

        def make(idx: Tensor) -> tuple[Tensor, Tensor]:
            img, sub = idx // s, idx % s
            pix = removed[img, sub][:, cell].view(-1, 1, h, w)
            return torch.where(pix, base[img], x[img]), target[img]

        perturbed = generated_scores(model, n * s, make, ctx, p.output, dev).view(n, s)
        drop = clean.view(n, 1).double() - perturbed.double()
        mass = cell_sums(maps.to(dev).double().reshape(n, h * w), cell, n_cells)
        attr = (removed.double() * mass.view(n, 1, n_cells)).sum(-1)
        corr = spearman(attr, drop) if p.correlation == "spearman" else pearson(attr, drop)
        return {"correlation": torch.nan_to_num(corr, nan=0.0).float()}
