"""Plain-gradient methods that share one forward and one backward pass.

``saliency`` (Simonyan et al. 2014) and ``gradient_x_input`` (Shrikumar et al. 2016) both need
only d f_target / d x; computing them in one group costs one pass instead of one per method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor, nn

from .base import Context, Method, input_gradient, register


@register
class Saliency(Method):
    """Gradient magnitude: max over channels of |d f_target / d x| (Simonyan et al. 2014)."""

    name = "saliency"
    family = "gradient"
    signed = False
    share_group = "gradient"
    channel_rule = "max over channels of the absolute gradient"

    @dataclass
    class Params:
        pass

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        return self.from_gradient(input_gradient(model, x, target, ctx), x)

    @staticmethod
    def from_gradient(grad: Tensor, x: Tensor) -> Tensor:
        return grad.abs().amax(dim=1)

    @classmethod
    def attribute_group(
        cls, methods: Sequence[Method], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        grad = input_gradient(model, x, target, ctx)
        return {m.name: m.from_gradient(grad, x) for m in methods}  # type: ignore[attr-defined]


@register
class GradientXInput(Saliency):
    """Gradient times input, summed over channels (signed)."""

    name = "gradient_x_input"
    signed = True
    channel_rule = "sum over channels"

    @staticmethod
    def from_gradient(grad: Tensor, x: Tensor) -> Tensor:
        return (grad * x.float()).sum(dim=1)
