"""Layer-wise Relevance Propagation (Bach et al. 2015; Montavon et al. 2019) through zennit.

The rules, the composites (which rule goes on which layer) and the canonizers (temporary
rewrites of the model that the rules need, e.g. BatchNorm merged into the preceding
convolution) are zennit's (Anders et al. 2021); this module only chooses them from the
parameters, runs them batch by batch and guarantees that the model comes back as it was.

One chunk: the composite's hooks are on the model, the chunk goes forward, and one
``torch.autograd.grad`` call w.r.t. the input with the output seeded by one-hot(target) x output
(the target logit's relevance is the logit itself) returns the input relevance (N, C, H, W):
exactly what zennit's ``Gradient`` attributor returns with the same composite and that output
seed. The map is its sum over channels (signed; conservation: the map sums to ~the target logit
on a bias-free network).

Refused, by name: TorchScript and traced/exported models (hooks would not fire), attention and
LayerNorm/GroupNorm (no rule in these composites), a residual ``+`` left in the forward (counted
while the model runs; the residual canonizers remove those of torchvision ResNets and of the
zoo's digits_resnet), BatchNorm in training mode when a canonizer merges it.

The model is modified while a call runs (canonizers rewrite weights and forwards, hooks sit on
its layers) and restored afterwards, even on an error: zennit removes what it registered, and a
snapshot of every module's parameters, buffers, submodules, attributes and hook tables taken
before the call restores whatever zennit could not (its composite leaves a canonizer that failed
half-way applied). The model must not be used by another thread during the call.

zennit (and with it torchvision) is imported on the first call, not when the package is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import Context, Method, ModelCheckError, autocast_ctx, register, run_in_chunks, working_dtype

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "alpha_beta")
CANONIZERS = ("auto", "none", "sequential_merge_batchnorm", "vgg", "resnet", "digits_resnet")

#: modules whose computation none of the composites has a rule for: zennit would pass the
#: relevance through them unchanged (it counts MultiheadAttention as an activation) or take
#: their plain gradient, which is not LRP of the model
UNSUPPORTED = (nn.MultiheadAttention, nn.LayerNorm, nn.GroupNorm, nn.TransformerEncoderLayer,
               nn.TransformerDecoderLayer)

#: time per image in forward+backward passes of the model, by composite: the model's forward and
#: backward, plus a forward and backward of every convolution per modified copy its rule
#: evaluates in the backward (z+: 2, gamma: 5, alpha-beta: 4). Measured against the bare
#: forward+backward (docs/methods.md): 2.4-3.5, 5.0-7.3, 5.1-6.1 on resnet18 at 224 px; 4-15 on
#: the 32-px zoo models, where zennit's per-layer Python work dominates
COST = {"epsilon_plus_flat": 3.0, "epsilon_gamma_box": 6.0, "alpha_beta": 5.0}


# --------------------------------------------------------------------------------------------
# Canonizers
# --------------------------------------------------------------------------------------------


def _digits_block_forward(self, x: Tensor) -> Tensor:
    """``architectures.ResidualBlock.forward`` with the residual addition done by a ``Sum`` module (zennit's Norm
    rule splits the relevance between the branches in proportion to their contributions; a
    plain ``+`` would hand both branches the whole relevance)."""
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out = self.canonizer_sum(torch.stack([self.shortcut(x), out], dim=-1))
    return F.relu(out)


def _digits_block_attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
    from zennit.layer import Sum

    from ..architectures import ResidualBlock

    if isinstance(module, ResidualBlock):
        return {"forward": _digits_block_forward.__get__(module), "canonizer_sum": Sum()}
    return None


def resolve_canonizer(model: nn.Module, canonizer: str = "auto") -> str:
    """The canonizer ``canonizer="auto"`` picks for ``model`` (any other value is returned as is):
    "resnet" when the model holds torchvision ResNet blocks, "digits_resnet" when it holds the
    zoo's residual blocks, "vgg" for a torchvision VGG, else "sequential_merge_batchnorm" (a
    no-op on a model without BatchNorm)."""
    if canonizer != "auto":
        return canonizer
    from torchvision.models import VGG
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from ..architectures import ResidualBlock

    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, (BasicBlock, Bottleneck)) for k in kinds):
        return "resnet"
    if any(issubclass(k, ResidualBlock) for k in kinds):
        return "digits_resnet"
    if isinstance(model, VGG):
        return "vgg"
    return "sequential_merge_batchnorm"


def build_canonizers(name: str) -> list:
    """Fresh zennit canonizer instances for a resolved canonizer name."""
    from zennit.canonizers import AttributeCanonizer, SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if name == "none":
        return []
    if name == "sequential_merge_batchnorm":
        return [SequentialMergeBatchNorm()]
    if name == "vgg":
        return [VGGCanonizer()]
    if name == "resnet":
        return [ResNetCanonizer()]
    if name == "digits_resnet":
        return [SequentialMergeBatchNorm(), AttributeCanonizer(_digits_block_attributes)]
    raise ValueError(f"unknown canonizer {name!r}; valid: {list(CANONIZERS)}")


_ADDS = frozenset({torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__})


class ResidualAdds(TorchFunctionMode):
    """Counts, while active, the additions of two same-shaped tensors that both come out of the
    autograd graph: a residual connection written as ``+`` in a forward. No rule can sit on a
    ``+`` that is not a module, so the backward hands both branches the whole relevance (a
    ResNet's map would sum to 2 ** blocks times the logit); the residual canonizers replace it
    by a ``Sum`` module, after which none is left."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func in _ADDS and len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor)
                and args[0].grad_fn is not None and args[1].grad_fn is not None
                and args[0].shape == args[1].shape):
            self.count += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# The model as it was
# --------------------------------------------------------------------------------------------

_HOOK_TABLES = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)


class ModelState:
    """A snapshot of every module's state that LRP may touch, by reference (nothing is copied):
    parameter and buffer objects and the tensors they hold (canonizers replace ``.data``),
    submodules, instance attributes (canonizers set ``forward``), hook tables, training flags.
    ``restore()`` puts all of it back."""

    def __init__(self, model: nn.Module):
        self.entries = []
        for m in model.modules():
            self.entries.append((
                m,
                dict(m._parameters),
                {k: (p.data, p.requires_grad) for k, p in m._parameters.items() if p is not None},
                dict(m._buffers),
                {k: b.data for k, b in m._buffers.items() if b is not None},
                dict(m._modules),
                set(m.__dict__),
                {t: set(getattr(m, t)) for t in _HOOK_TABLES if hasattr(m, t)},
                m.training,
            ))

    def restore(self) -> None:
        for m, params, pdata, buffers, bdata, modules, attrs, hooks, training in self.entries:
            for k in set(m.__dict__) - attrs:
                delattr(m, k)
            m._parameters.clear()
            m._parameters.update(params)
            for k, (data, requires_grad) in pdata.items():
                params[k].data = data
                params[k].requires_grad_(requires_grad)
            m._buffers.clear()
            m._buffers.update(buffers)
            for k, data in bdata.items():
                buffers[k].data = data
            m._modules.clear()
            m._modules.update(modules)
            for table, keys in hooks.items():
                d = getattr(m, table)
                for key in set(d) - keys:
                    del d[key]
            m.training = training


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@register
class LRP(Method):
    """Layer-wise Relevance Propagation with zennit's composites and canonizers (signed)."""

    name = "lrp"
    family = "gradient"
    signed = True
    channel_rule = "sum over channels"

    @dataclass
    class Params:
        #: which rule goes on which layer: "epsilon_plus_flat" (flat on the first layer, z+ on
        #: convolutions, epsilon on dense layers), "epsilon_gamma_box" (z-box on the first
        #: convolution, gamma on the others, epsilon on dense layers; needs low and high),
        #: "alpha_beta" (alpha-beta on convolutions, epsilon on dense layers)
        composite: Literal["epsilon_plus_flat", "epsilon_gamma_box", "alpha_beta"] = "epsilon_plus_flat"
        #: temporary rewrite of the model before the rules apply; "auto" picks by model type
        #: (``resolve_canonizer``)
        canonizer: Literal[
            "auto", "none", "sequential_merge_batchnorm", "vgg", "resnet", "digits_resnet"
        ] = "auto"
        #: the epsilon rule's stabiliser (dense layers, every composite); > 0
        epsilon: float = 1e-6
        #: the stabiliser of every other rule; > 0
        stabilizer: float = 1e-6
        #: the gamma rule's weight on positive contributions (epsilon_gamma_box)
        gamma: float = 0.25
        #: alpha-beta's weights (alpha_beta); alpha - beta must equal 1 exactly, both >= 0
        alpha: float = 2.0
        beta: float = 1.0
        #: the smallest and largest value a pixel can take in the model's input space, one number
        #: or one per channel, e.g. (0 - mean) / std and (1 - mean) / std (epsilon_gamma_box only,
        #: which needs both; the method's context does not know the data's normalisation)
        low: float | list[float] | None = None
        high: float | list[float] | None = None

        def validate(self) -> None:
            if not (self.epsilon > 0 and self.stabilizer > 0):
                raise ValueError("epsilon and stabilizer must be > 0")
            if self.gamma < 0:
                raise ValueError("gamma must be >= 0")
            if self.alpha < 0 or self.beta < 0 or self.alpha - self.beta != 1:
                raise ValueError(f"alpha and beta must be >= 0 with alpha - beta == 1 exactly (zennit's "
                                 f"check; e.g. 2 and 1, 1 and 0), got {self.alpha} and {self.beta}")
            box = self.composite == "epsilon_gamma_box"
            if not box and (self.low is not None or self.high is not None):
                raise ValueError("low and high apply to composite 'epsilon_gamma_box' only")
            if box:
                if self.low is None or self.high is None:
                    raise ValueError(
                        "composite 'epsilon_gamma_box' needs low and high: the smallest and largest pixel "
                        "value in the model's input space, e.g. (0 - mean) / std and (1 - mean) / std per channel")
                low, high = _as_list(self.low), _as_list(self.high)
                n = max(len(low), len(high))
                if {len(low), len(high)} - {1, n}:
                    raise ValueError(f"low and high must have one value or one per channel, got {low} and {high}")
                if not all(lo < hi for lo, hi in zip(low * (n // len(low)), high * (n // len(high)))):
                    raise ValueError(f"low must be below high, got {low} and {high}")

    def cost(self) -> float:
        """Forward+backward equivalents per image (see ``COST``)."""
        return COST[self.params.composite]

    def build_composite(self, model: nn.Module, x: Tensor, canonizer: str | None = None):
        """A fresh zennit composite for these parameters, with the canonizers for ``model``
        (``canonizer``: the resolved name, by default from the parameters)."""
        from zennit.composites import (
            EpsilonAlpha2Beta1,
            EpsilonGammaBox,
            EpsilonPlusFlat,
        )
        from zennit.rules import AlphaBeta
        from zennit.types import Convolution

        p = self.params
        canonizers = build_canonizers(canonizer or resolve_canonizer(model, p.canonizer))
        if p.composite == "epsilon_plus_flat":
            return EpsilonPlusFlat(epsilon=p.epsilon, stabilizer=p.stabilizer, canonizers=canonizers)
        if p.composite == "epsilon_gamma_box":
            low, high = (_box_bound(v, x, name) for v, name in ((p.low, "low"), (p.high, "high")))
            return EpsilonGammaBox(low=low, high=high, epsilon=p.epsilon, gamma=p.gamma,
                                   stabilizer=p.stabilizer, canonizers=canonizers)
        # zennit's alpha-beta composite fixes alpha = 2, beta = 1; a rule put first in its layer
        # map takes the convolutions with the parameters asked for (identical at the defaults)
        rule = AlphaBeta(alpha=p.alpha, beta=p.beta, stabilizer=p.stabilizer)
        return EpsilonAlpha2Beta1(epsilon=p.epsilon, stabilizer=p.stabilizer,
                                  layer_map=[(Convolution, rule)], canonizers=canonizers)

    def check_model(self, model: nn.Module, example: Tensor, ctx: Context) -> None:
        """The whole method on ``example`` (one image, one pass): the model has rules for every
        module, the canonizer fits it and keeps its output, no residual ``+`` is left."""
        try:
            with torch.no_grad():
                target = model(example).argmax(dim=1)
            self.attribute_full(model, example, target, ctx)
        except ValueError as exc:
            wrong_canonizer = "canonizer" in str(exc) and self.params.canonizer != "auto"
            raise ModelCheckError(str(exc), "canonizer" if wrong_canonizer else None) from None

    def resolved_choices(self, model: nn.Module, x: Tensor, ctx: Context) -> dict[str, Any]:
        """The canonizer this method puts on ``model`` (``resolve_canonizer``)."""
        return {"canonizer": resolve_canonizer(model, self.params.canonizer)}

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        return self.attribute_full(model, x, target, ctx).sum(dim=1)

    def attribute_full(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        """The input relevance (N, C, H, W) before the channel reduction."""
        check_model(model, self.params.canonizer)
        dtype = working_dtype(x)
        canonizer = resolve_canonizer(model, self.params.canonizer)
        composite = self.build_composite(model, x.to(dtype), canonizer)
        state = ModelState(model)

        def one(sl: slice) -> Tensor:
            xi = x[sl].detach().to(dtype).requires_grad_(True)
            try:
                # the backward runs under autocast too: the rules re-run layers on the inputs
                # the forward stored, which autocast made low-precision
                with torch.enable_grad(), autocast_ctx(ctx, xi.device):
                    with ResidualAdds() as adds:
                        out = model(xi)
                    if adds.count:
                        raise ValueError(
                            f"lrp: the model's forward adds two activations with '+' {adds.count} times (residual "
                            "connections); no LRP rule can sit on a '+' that is not a module, so both branches "
                            "would get the whole relevance. Canonizers rewrite the residual blocks of torchvision "
                            "ResNets ('resnet') and of the zoo's digits_resnet ('digits_resnet'); canonizer "
                            f"{canonizer!r} leaves these in place")
                    if out.dim() != 2:
                        raise ValueError(f"lrp needs (N, classes) outputs, got shape {tuple(out.shape)}")
                    seed = torch.zeros_like(out).scatter_(1, target[sl].view(-1, 1).to(out.device), 1.0)
                    (rel,) = torch.autograd.grad(out, xi, grad_outputs=seed * out.detach())
            finally:
                for hook in list(composite.hook_refs):
                    hook.stored_tensors.clear()  # a chunk's activations go with the chunk
            return rel.to(dtype)

        try:
            before = _probe(model, x, dtype)
            try:
                composite.register(model)
            except Exception as exc:  # e.g. a BatchNorm without affine parameters to merge
                raise ValueError(f"lrp: zennit could not put composite {self.params.composite!r} with canonizer "
                                 f"{canonizer!r} on the model: {type(exc).__name__}: {exc}") from exc
            _check_canonized(before, _probe(model, x, dtype), canonizer)
            _warn_without_layers(model)
            return run_in_chunks(one, x.shape[0], ctx)
        finally:
            try:
                composite.remove()
            finally:
                state.restore()


def _as_list(v: float | list[float]) -> list[float]:
    return [float(v)] if isinstance(v, (int, float)) else [float(u) for u in v]


def _box_bound(v: float | list[float] | None, x: Tensor, name: str) -> Tensor:
    values = _as_list(v)  # type: ignore[arg-type]
    if len(values) not in (1, x.shape[1]):
        raise ValueError(f"lrp: {name} has {len(values)} values for {x.shape[1]}-channel images")
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, *([1] * (x.dim() - 2)))


def _probe(model: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The model's output for the batch's first image (no gradient, no autocast); None for a
    model in training mode (dropout would make two calls differ)."""
    if model.training or x.shape[0] == 0:
        return None
    with torch.no_grad():
        return model(x[:1].detach().to(dtype))


def _check_canonized(before: Tensor | None, after: Tensor | None, canonizer: str) -> None:
    """Refuse a canonizer that changed what the model computes. zennit pairs a BatchNorm with the
    layer before it in module-registration order; where the forward runs them in another order
    the merge folds it into the wrong layer (a mismatch of channel counts fails loudly, a match
    silently). A correct merge differs only by zennit's (1 + eps) ** -0.5 per BatchNorm."""
    if before is None or after is None:
        return
    scale = float(before.abs().max())
    diff = float((after - before).abs().max())
    if not diff <= 1e-2 * scale + 1e-6:  # also catches NaN
        raise ValueError(
            f"lrp: canonizer {canonizer!r} changes the model's output (max difference {diff:.3g}, largest logit "
            f"{scale:.3g}): a BatchNorm was folded into a layer whose output it does not normalise (zennit pairs "
            "them in module-registration order). Use canonizer 'none' (BatchNorm then passes relevance unchanged)")


def check_model(model: nn.Module, canonizer: str) -> None:
    """Refuse the models these composites cannot explain, naming the reason."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("lrp needs an eager nn.Module: hooks on a TorchScript model (model.kind "
                         "'torchscript') are not called, and zennit would return a plain gradient")
    if isinstance(model, torch.fx.GraphModule):
        raise ValueError("lrp needs the model's layers as modules: a traced or exported model (model.kind "
                         "'export') computes them as functions, and zennit would return a plain gradient")
    for name, m in model.named_modules():
        if isinstance(m, UNSUPPORTED):
            raise ValueError(
                f"lrp: module {name!r} ({type(m).__name__}) has no rule in zennit's composites (attention and "
                "LayerNorm/GroupNorm: transformers and ConvNeXt-like models are not supported; LRP for them "
                "needs rules such as AttnLRP's, not implemented)")
    if canonizer != "none":
        training = [n for n, m in model.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if training:
            raise ValueError(f"lrp: BatchNorm {training[0]!r} is in training mode; the canonizer merges "
                             "BatchNorm's running statistics into the layer before it: call model.eval()")


def _warn_without_layers(model: nn.Module) -> None:
    from zennit.types import Convolution, Linear

    if not any(isinstance(m, (Convolution, Linear)) for m in model.modules()):
        warnings.warn(
            f"lrp: {type(model).__name__} has no Linear or convolution module for the LRP rules to act on; "
            "its computation is differentiated as usual, so the map is the gradient times the target logit",
            stacklevel=4,
        )
