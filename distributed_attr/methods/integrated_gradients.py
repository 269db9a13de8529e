"""Integrated Gradients (Sundararajan, Taly & Yan 2017).

IG_i(x) = (x_i - b_i) * integral_0^1 d f(b + a (x - b)) / d x_i da, approximated by a quadrature
rule over ``steps`` points. All steps x images go through the model as one flattened batch split
to ``ctx.max_batch`` samples (a chunk's path points are built when it runs), so the cost is
``steps`` forward+backward passes per image whatever the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .base import Context, Method, for_each_chunk, register, working_dtype
from .gradient import gradient_pass

Rule = Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1] for ``rule``; the weights sum to 1."""
    n = steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (nodes + 1) / 2, weights / 2
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs at least 2 steps")
        alphas = np.linspace(0.0, 1.0, n)
        weights = np.full(n, 1.0 / (n - 1))
        weights[0] = weights[-1] = 0.5 / (n - 1)
        return alphas, weights
    offsets = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}
    if rule not in offsets:
        raise ValueError(f"unknown integration rule {rule!r}")
    alphas = (np.arange(n) + offsets[rule]) / n
    return alphas, np.full(n, 1.0 / n)


@register
class IntegratedGradients(Method):
    """Path integral of gradients from a baseline to the image, times (image - baseline)."""

    name = "integrated_gradients"
    compile_safe = True
    family = "gradient"
    signed = True
    channel_rule = "sum over channels (keeps completeness: the map sums to f(x) - f(baseline))"

    @dataclass
    class Params:
        steps: int = 32
        #: constant baseline value, in the model's (normalised) input space
        baseline: float = 0.0
        rule: Rule = "gausslegendre"

        def validate(self) -> None:
            if self.steps < 1:
                raise ValueError("steps must be >= 1")

    def cost(self) -> float:
        return float(self.params.steps)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        return self.attribute_full(model, x, target, ctx).sum(dim=1)

    def attribute_full(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        """Per-channel IG, (N, C, H, W)."""
        p = self.params
        alphas, weights = quadrature(p.rule, p.steps)
        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        base = torch.full_like(x, p.baseline)
        delta = x - base
        a = torch.as_tensor(alphas, dtype=dtype, device=x.device)
        w = torch.as_tensor(weights, dtype=dtype, device=x.device)
        n, s = x.shape[0], p.steps
        total = torch.zeros_like(x)

        # Flattened (image, step) pairs, image-major; each chunk builds only its own path points,
        # so memory is one chunk, not steps x images.
        def one(sl: slice) -> None:
            pair = torch.arange(sl.start, sl.stop, device=x.device)
            img, step = pair // s, pair % s
            points = base[img] + a[step].view(-1, 1, 1, 1) * delta[img]
            grad = gradient_pass(model, points, target[img], ctx).input_grad
            total.index_add_(0, img, grad * w[step].view(-1, 1, 1, 1))  # type: ignore[operator]

        for_each_chunk(one, n * s, ctx)
        return total * delta
