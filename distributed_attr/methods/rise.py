"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

Each mask starts as a ``grid`` x ``grid`` array of independent Bernoulli(``p``) cells, is
upsampled bilinearly to (grid + 1) x cell size (cell = ceil(H / grid)) and cropped to H x W at a
random shift in [0, cell) on each axis, which makes the masks smooth and not aligned with the
grid. The saliency of pixel u is sum_masks P(target | x * M) M(u) / (masks * p): the expected
score given that u is kept (Monte-Carlo estimate of E[f(x * M) | M(u) = 1] up to the 1/p factor
the paper uses). Removed pixels go to ``baseline`` (0, the paper's choice, is the mean colour in a
normalised input space). The same mask multiplies every channel.

Masks are drawn per image from ``per_image_generators`` (cells and shifts up front, small), so a
map does not depend on which other images share the batch; they are upsampled one chunk at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    Context,
    Method,
    autocast_ctx,
    for_each_chunk,
    output_scores,
    per_image_generators,
    register,
    working_dtype,
)


def rise_masks(cells: Tensor, shifts: Tensor, height: int, width: int) -> Tensor:
    """(k, H, W) masks from (k, g, g) binary cells and (k, 2) integer (row, column) shifts."""
    k, g, _ = cells.shape
    cell_h, cell_w = math.ceil(height / g), math.ceil(width / g)
    up = F.interpolate(
        cells.unsqueeze(1), size=((g + 1) * cell_h, (g + 1) * cell_w), mode="bilinear", align_corners=False
    ).squeeze(1)
    rows = shifts[:, 0:1] + torch.arange(height, device=cells.device)  # (k, H)
    cols = shifts[:, 1:2] + torch.arange(width, device=cells.device)  # (k, W)
    return up[torch.arange(k, device=cells.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


@register
class RISE(Method):
    """RISE: score-weighted average of random smooth masks."""

    name = "rise"
    compile_safe = True
    family = "prediction"
    signed = False
    cost_unit = "forward"
    channel_rule = "none needed: one mask multiplies every channel"

    @dataclass
    class Params:
        masks: int = 4000
        grid: int = 7
        #: probability that a grid cell is kept
        p: float = 0.5
        baseline: float = 0.0
        output: Literal["probability", "logit"] = "probability"

        def validate(self) -> None:
            if self.masks < 1 or self.grid < 1:
                raise ValueError("masks and grid must be >= 1")
            if not 0.0 < self.p <= 1.0:
                raise ValueError("p must be in (0, 1]")

    def cost(self) -> float:
        return float(self.params.masks)

    def draw(self, n_images: int, height: int, width: int, ctx: Context) -> tuple[Tensor, Tensor]:
        """Per image: (N, masks, g, g) binary cells and (N, masks, 2) shifts, on the CPU."""
        p = self.params
        cell_h, cell_w = math.ceil(height / p.grid), math.ceil(width / p.grid)
        cells, shifts = [], []
        for g in per_image_generators(ctx.seed, self.name, ctx.indices_for(n_images)):
            cells.append((torch.rand((p.masks, p.grid, p.grid), generator=g) < p.p).float())
            shifts.append(torch.stack([
                torch.randint(0, cell_h, (p.masks,), generator=g),
                torch.randint(0, cell_w, (p.masks,), generator=g),
            ], dim=1))
        return torch.stack(cells), torch.stack(shifts)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        p = self.params
        n, _, height, width = x.shape
        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        cells, shifts = self.draw(n, height, width, ctx)
        cells, shifts = cells.to(x.device), shifts.to(x.device)
        saliency = torch.zeros(n, height, width, dtype=dtype, device=x.device)

        def one(sl: slice) -> None:
            pair = torch.arange(sl.start, sl.stop, device=x.device)
            img, k = pair // p.masks, pair % p.masks
            m = rise_masks(cells[img, k], shifts[img, k], height, width).to(dtype)
            masked = x[img] * m[:, None] + p.baseline * (1 - m[:, None])
            with torch.no_grad(), autocast_ctx(ctx, x.device):
                score = output_scores(model(masked), target[img], p.output).to(dtype)
            saliency.index_add_(0, img, score.view(-1, 1, 1) * m)

        for_each_chunk(one, n * p.masks, ctx)
        return saliency / (p.masks * p.p)
