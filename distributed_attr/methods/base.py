"""The contract every attribution method follows, and the helpers they share.

A method is a pure, batched tensor function: ``(model, x (N,C,H,W), target (N,), ctx) -> (N,H,W)``.
It never touches files. Everything a method needs besides the images arrives in ``Context``:
the seed and the images' global indices (randomness is drawn per image, so a unit retried on
another actor with another batch composition reproduces its maps bit for bit), the layer for CAM
methods, the number of samples one forward pass may hold, and the autocast dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..commons import (  # noqa: F401  (re-exported: the helpers methods share with metrics)
    BatchContext,
    autocast_ctx,
    forward_probabilities,
    image_seed,
    is_oom,
    output_scores,
    per_image_generators,
    per_image_rand,
    per_sample_seeds,
    run_in_chunks,
    sample_randn,
    select_scores,
    working_dtype,
)
from ..registry import Registry, build_params, describe_params

METHODS: Registry["Method"] = Registry("method")


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator adding a method to the registry."""
    return METHODS.register(cls)


@dataclass
class Context(BatchContext):
    """What a method may use besides the model, the images and the targets: the batch's seed,
    indices, budget and autocast (``BatchContext``), plus what methods alone need."""

    #: the module CAM methods hook; resolved by the caller (see ``resolve_layer``)
    layer: nn.Module | None = None
    #: reference images for methods that need other natural images (Soundness Saliency)
    references: Tensor | None = None


class Method:
    """Base class. Subclasses set the class attributes and implement ``attribute``.

    Class attributes
    ----------------
    name: registry key.
    family: "gradient", "prediction" or "optimisation".
    signed: whether the stored map keeps its sign.
    needs_layer: whether ``ctx.layer`` must be set (CAM methods).
    share_group: methods with the same group are computed together by ``attribute_group``
        (one forward+backward for saliency/gradient x input/Grad-CAM/Grad-CAM++; the same noisy
        samples for SmoothGrad/VarGrad/SquareGrad).
    cost: forward+backward passes per image, as a function of the parameters (for docs, budgets).
    channel_rule: how the map is reduced over channels (documented in docs/methods.md).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    signed: ClassVar[bool] = True
    needs_layer: ClassVar[bool] = False
    share_group: ClassVar[str | None] = None
    channel_rule: ClassVar[str] = "sum over channels"
    #: what ``cost()`` counts: "forward+backward" passes, or "forward" passes (no backward)
    cost_unit: ClassVar[str] = "forward+backward"
    #: whether the method wants ``ctx.references`` (other natural images of the dataset)
    needs_references: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, **params: Any):
        self.params = build_params(self.Params, params, where=f"methods.{self.name}")

    def cost(self) -> float:
        """Forward+backward passes per image (1 for the plain gradient)."""
        return 1.0

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    @classmethod
    def attribute_group(
        cls, methods: Sequence["Method"], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        """Compute several methods of one ``share_group`` at once; default: one by one."""
        return {m.name: m.attribute(model, x, target, ctx) for m in methods}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "family": cls.family,
            "signed": cls.signed,
            "needs_layer": cls.needs_layer,
            "needs_references": cls.needs_references,
            "share_group": cls.share_group,
            "channel_rule": cls.channel_rule,
            "cost_unit": cls.cost_unit,
            "params": describe_params(cls.Params),
            "doc": (cls.__doc__ or "").strip().split("\n")[0],
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dataclasses.asdict(self.params)})"


# --------------------------------------------------------------------------------------------
# Helpers of the methods alone (those shared with metrics live in ``distributed_attr.commons``)
# --------------------------------------------------------------------------------------------


def resolve_layer(model: nn.Module, layer: str | None, example: Tensor | None = None) -> nn.Module:
    """The module CAM methods hook: ``layer`` by dotted name, or else the last module, in
    execution order, whose output is a spatial feature map (N, C, h, w) with h*w > 1.

    Forward hooks fire inner-first, so "last to fire" picks the outermost stage that ends the
    convolutional trunk (``layer4`` of a ResNet, ``features`` of a VGG): the layer Grad-CAM's
    reference implementations use. Found by one forward pass of ``example`` (one image)."""
    if layer:
        try:
            return model.get_submodule(layer)
        except AttributeError:
            names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Conv2d)]
            raise ValueError(
                f"layer {layer!r} is not a submodule of the model; convolutional layers: {names}"
            ) from None
    if example is None:
        raise ValueError("resolving the CAM layer automatically needs an example input")
    last: list[nn.Module] = []

    def hook(module, _inputs, output):
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            last.append(module)

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    if not last:
        raise ValueError("no module outputs a spatial feature map; name the CAM layer with 'layer'")
    return last[-1]


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    return METHODS.get(name)(**(params or {}))
