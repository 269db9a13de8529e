"""Occlusion (Zeiler & Fergus 2014), with Captum's ``Occlusion`` semantics.

A ``patch`` x ``patch`` window (all channels at once) slides with ``stride``; window positions
along a side of length L start at 0, stride, ... for ceil((L - patch) / stride) + 1 positions,
the last one cropped at the border, so every pixel is covered. For each window,
d = f(x) - f(x with the window set to ``baseline``); a pixel's attribution is the mean of d over
the windows that cover it. f is the target logit (Captum's convention) or probability.

All window positions x images go through the model as one flattened batch in chunks of
``ctx.max_batch``; a chunk builds its occluded images when it runs. A window whose pixels all
already equal the baseline (black background under baseline 0, padding) leaves the image
unchanged, so its drop is exactly 0 and it is not evaluated: an exact saving, large on images
with flat backgrounds, none on natural photographs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Context, Method, autocast_ctx, output_scores, register, run_in_chunks, working_dtype


def window_starts(length: int, patch: int, stride: int) -> Tensor:
    """Start offsets of the windows along one side (Captum's count: ceil((L-p)/s) + 1)."""
    count = math.ceil((length - patch) / stride) + 1
    return torch.arange(count, dtype=torch.int64) * stride


@register
class Occlusion(Method):
    """Mean drop of the target score over the sliding windows that cover each pixel."""

    name = "occlusion"
    compile_safe = True
    family = "prediction"
    signed = True
    cost_unit = "forward"
    channel_rule = "none needed: channels are occluded together, so the map is one per pixel"

    @dataclass
    class Params:
        patch: int = 8
        stride: int = 4
        #: value the window is set to, in the model's (normalised) input space
        baseline: float = 0.0
        output: Literal["logit", "probability"] = "logit"

        def validate(self) -> None:
            if self.patch < 1 or self.stride < 1:
                raise ValueError("patch and stride must be >= 1")
            if self.stride > self.patch:
                raise ValueError(f"stride ({self.stride}) must not exceed patch ({self.patch}): pixels would be skipped")

    def cost(self, height: int = 224, width: int = 224) -> float:
        p = self.params
        return float(len(window_starts(height, p.patch, p.stride)) * len(window_starts(width, p.patch, p.stride)) + 1)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        p = self.params
        n, _, height, width = x.shape
        if p.patch > min(height, width):
            raise ValueError(f"occlusion patch {p.patch} exceeds the image size {height}x{width}")
        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        rows = window_starts(height, p.patch, p.stride).to(x.device)
        cols = window_starts(width, p.patch, p.stride).to(x.device)
        nh, nw = len(rows), len(cols)
        windows = nh * nw
        ys = torch.arange(height, device=x.device)
        xs = torch.arange(width, device=x.device)

        def scores(inputs: Tensor, tgt: Tensor) -> Tensor:
            with torch.no_grad(), autocast_ctx(ctx, inputs.device):
                return output_scores(model(inputs), tgt, p.output).to(dtype)

        # Which (image, window) pairs change the image at all: count the pixels that differ from
        # the baseline in every window (a strided sum over a zero-padded map).
        differs = (x != p.baseline).any(dim=1, keepdim=True).to(dtype)
        pad_h, pad_w = (nh - 1) * p.stride + p.patch - height, (nw - 1) * p.stride + p.patch - width
        differs = F.pad(differs, (0, max(0, pad_w), 0, max(0, pad_h)))
        ones = torch.ones(1, 1, p.patch, p.patch, dtype=dtype, device=x.device)
        active = (F.conv2d(differs, ones, stride=p.stride)[:, 0, :nh, :nw] > 0).flatten()
        pairs = active.nonzero().squeeze(1)  # flat image-major (image, window) indices to evaluate

        def one(sl: slice) -> Tensor:
            pair = pairs[sl]
            img, win = pair // windows, pair % windows
            r0, c0 = rows[win // nw], cols[win % nw]
            in_rows = (ys[None, :] >= r0[:, None]) & (ys[None, :] < r0[:, None] + p.patch)
            in_cols = (xs[None, :] >= c0[:, None]) & (xs[None, :] < c0[:, None] + p.patch)
            hole = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (k, 1, H, W)
            occluded = torch.where(hole, torch.as_tensor(p.baseline, dtype=dtype, device=x.device), x[img])
            return scores(occluded, target[img])

        clean = run_in_chunks(lambda sl: scores(x[sl], target[sl]), n, ctx)
        drop = torch.zeros(n * windows, dtype=dtype, device=x.device)
        if len(pairs):
            drop[pairs] = clean[pairs // windows] - run_in_chunks(one, len(pairs), ctx)
        drop = drop.view(n, 1, nh, nw)
        # Spread each window's drop over its pixels and count the covering windows: both are a
        # transposed convolution with a patch of ones, cropped to the image.
        total = F.conv_transpose2d(drop, ones, stride=p.stride)[:, 0, :height, :width]
        count = F.conv_transpose2d(torch.ones_like(drop[:1]), ones, stride=p.stride)[:, 0, :height, :width]
        return total / count
