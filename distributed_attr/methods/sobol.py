"""Sobol attribution (Fel, Cadène, Chalvidal, Cord, Vigouroux & Serre, NeurIPS 2021, "Look at the
Variance! Efficient Black-box Explanations with Sobol-based Sensitivity Analysis").

The image is cut into a ``grid`` x ``grid`` array of cells; cell i is scaled by a mask variable
m_i in [0, 1] (``inpainting``: x * M, M upsampled from the grid by nearest neighbour so each cell
is one variable). The map is the total-order Sobol index of every m_i for the target score,
ST_i = E[Var(f | m_~i)] / Var(f), estimated with a quasi-Monte-Carlo design and Jansen's
estimator:

- a scrambled Sobol sequence of dimension 2 d (d = grid^2), ``design`` points, gives two
  matrices A, B (design x d); C_i is A with column i taken from B;
- ST_i = mean_j (f(A_j) - f(C_i,j))^2 / (2 Var(f)), Var over f(A) and f(B) together (ddof 1).

That is design x (d + 2) forward passes per image (2,112 with the defaults). The (grid, grid)
indices are upsampled bilinearly to the input size. The design's scramble is seeded per image
from ``per_image_generators``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import qmc
from torch import Tensor, nn

from .base import (
    Context,
    Method,
    autocast_ctx,
    output_scores,
    per_image_generators,
    register,
    run_in_chunks,
    working_dtype,
)
from .gradient import upsample_to


def sobol_design(dim: int, design: int, seed: int) -> np.ndarray:
    """(design * (dim + 2), dim) mask variables: the rows of A, then B, then C_1 .. C_dim."""
    try:
        sampler = qmc.Sobol(2 * dim, scramble=True, rng=np.random.default_rng(seed))
    except TypeError:  # SciPy < 1.15 names the argument ``seed``
        sampler = qmc.Sobol(2 * dim, scramble=True, seed=np.random.default_rng(seed))
    ab = sampler.random(design)
    a, b = ab[:, :dim], ab[:, dim:]
    c = np.repeat(a[None], dim, axis=0)  # (dim, design, dim)
    idx = np.arange(dim)
    c[idx, :, idx] = b[:, idx].T
    return np.concatenate([a, b, c.reshape(dim * design, dim)], axis=0)


def jansen_total_indices(scores: Tensor, dim: int, design: int) -> Tensor:
    """(N, dim) total-order indices from (N, design * (dim + 2)) scores laid out as in
    ``sobol_design``. A constant score gives zeros."""
    f_a = scores[:, :design]
    f_b = scores[:, design:2 * design]
    f_c = scores[:, 2 * design:].reshape(-1, dim, design)
    var = torch.cat([f_a, f_b], dim=1).var(dim=1, correction=1)
    sq = ((f_a[:, None, :] - f_c) ** 2).mean(dim=2)
    return torch.where(var[:, None] > 0, sq / (2 * var[:, None]).clamp_min(torch.finfo(scores.dtype).tiny), torch.zeros_like(sq))


@register
class SobolAttribution(Method):
    """Total-order Sobol indices of grid-cell masks (Fel et al. 2021), Jansen estimator."""

    name = "sobol"
    compile_safe = True
    family = "prediction"
    signed = False
    cost_unit = "forward"
    channel_rule = "none needed: one mask multiplies every channel"

    @dataclass
    class Params:
        grid: int = 8
        #: points of the quasi-Monte-Carlo design (a power of two keeps the Sobol sequence balanced)
        design: int = 32
        #: "inpainting": x * M; "amplitude": mean + (x - mean) * M, mean per image and channel
        perturbation: Literal["inpainting", "amplitude"] = "inpainting"
        output: Literal["logit", "probability"] = "logit"

        def validate(self) -> None:
            if self.grid < 1:
                raise ValueError("grid must be >= 1")
            if self.design < 2:
                raise ValueError("design must be >= 2")

    def cost(self) -> float:
        return float(self.params.design * (self.params.grid ** 2 + 2))

    def designs(self, n_images: int, ctx: Context) -> Tensor:
        """(N, design * (d + 2), d) mask variables, one scrambled design per image (CPU, float32)."""
        p = self.params
        d = p.grid * p.grid
        out = []
        for g in per_image_generators(ctx.seed, self.name, ctx.indices_for(n_images)):
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            out.append(torch.from_numpy(sobol_design(d, p.design, seed)).float())
        return torch.stack(out)

    def total_indices(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        """(N, grid, grid) total-order Sobol indices before upsampling."""
        p = self.params
        n, _, height, width = x.shape
        d = p.grid * p.grid
        per_image = p.design * (d + 2)
        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        design = self.designs(n, ctx).to(device=x.device, dtype=dtype)
        centre = x.mean(dim=(2, 3), keepdim=True)

        def one(sl: slice) -> Tensor:
            pair = torch.arange(sl.start, sl.stop, device=x.device)
            img, row = pair // per_image, pair % per_image
            cells = design[img, row].view(-1, 1, p.grid, p.grid)
            m = F.interpolate(cells, size=(height, width), mode="nearest")
            if p.perturbation == "inpainting":
                perturbed = x[img] * m
            else:
                perturbed = centre[img] + (x[img] - centre[img]) * m
            with torch.no_grad(), autocast_ctx(ctx, x.device):
                return output_scores(model(perturbed), target[img], p.output).to(dtype)

        scores = run_in_chunks(one, n * per_image, ctx).view(n, per_image)
        return jansen_total_indices(scores, d, p.design).view(n, p.grid, p.grid)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        indices = self.total_indices(model, x, target, ctx)
        return upsample_to(indices, tuple(x.shape[-2:]))
