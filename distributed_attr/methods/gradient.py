"""Methods built from one forward and one backward pass.

``saliency`` (Simonyan et al. 2014), ``gradient_x_input`` (Shrikumar et al. 2016), ``gradcam``
(Selvaraju et al. 2017) and ``gradcam_pp`` (Chattopadhay et al. 2018) all need the gradient of
the target logit, w.r.t. the input or w.r.t. the activation of one layer. They form the share
group "gradient": whichever of them are requested, the batch goes through the model once, the
CAM layer's output is caught by a forward hook, and one ``torch.autograd.grad`` call returns the
gradients w.r.t. the input and the activation together.

The CAM layer may be a convolutional stage (N, K, h, w), a channels-last grid (N, h, w, C) (timm's
Swin) or a token sequence (N, T, C) (ViT, DeiT): the ``reshape`` parameter says how its output
becomes (N, K, h, w) maps (``base.grid_layout``; by default recognised from the shape, the class,
distillation and register tokens dropped); the activation and its gradient are mapped alike.

``guided_backprop`` (Springenberg et al. 2015) changes the backward pass of every ReLU, so it
cannot share that pass and runs on its own. A model whose forward runs no ReLU it can guide but
other rectifiers (GELU, SiLU, ...) is refused: the result would be the plain gradient.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import (
    GRID_LAYOUTS,
    Context,
    GroupedMethod,
    Method,
    ModelCheckError,
    autocast_ctx,
    layer_grid,
    register,
    resolve_layer,
    run_in_chunks,
    select_scores,
    working_dtype,
)


# --------------------------------------------------------------------------------------------
# One shared forward + backward pass
# --------------------------------------------------------------------------------------------


@dataclass
class GradientPass:
    """What one forward+backward pass of a slice of the batch yields."""

    x: Tensor  #: (k, C, H, W) the inputs, in the working dtype
    input_grad: Tensor | None  #: (k, C, H, W) d logit_target / d x, when asked for
    activation: Tensor | None  #: the CAM layer's output as it is ((k, K, h, w), (k, T, C), ...)
    activation_grad: Tensor | None  #: d logit_target / d activation, shaped like it
    layer_name: str = ""  #: the CAM layer's dotted name (for messages)


def gradient_pass(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    ctx: Context,
    *,
    input_grad: bool = True,
    layer: nn.Module | None = None,
) -> GradientPass:
    """Forward ``x`` (one slice; no chunking here), then differentiate the summed target logits
    w.r.t. the input and/or the output of ``layer`` in a single ``autograd.grad`` call.

    Only the requested tensors are differentiated: no parameter gradient is computed or
    accumulated (``p.grad`` stays None). The input always requires grad so that the layer's
    activation is part of the graph even when the model's weights are frozen."""
    dtype = working_dtype(x)
    xi = x.detach().to(dtype).requires_grad_(True)
    caught: list[Tensor] = []

    def catch(_module, _inputs, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"the CAM layer must output one tensor, got {type(output).__name__}")
        caught.append(output)

    handle = layer.register_forward_hook(catch) if layer is not None else None
    try:
        with torch.enable_grad(), autocast_ctx(ctx, xi.device):
            out = model(xi)
            score = select_scores(out, target.to(out.device)).to(dtype).sum()
    finally:
        if handle is not None:
            handle.remove()
    wrt: list[Tensor] = []
    if input_grad:
        wrt.append(xi)
    act = None
    if layer is not None:
        if not caught:
            raise ValueError(f"the CAM layer {type(layer).__name__} was not called by the model's forward")
        act = caught[-1]  # a module called twice: the last call is the one nearest the output
        wrt.append(act)
    grads = torch.autograd.grad(score, wrt) if wrt else ()
    grads = [g.to(dtype) for g in grads]
    return GradientPass(
        x=xi.detach(),
        input_grad=grads[0] if input_grad else None,
        activation=act.detach().to(dtype) if act is not None else None,
        activation_grad=grads[-1] if act is not None else None,
        layer_name=_module_name(model, layer) if layer is not None else "",
    )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), type(module).__name__)


class GradientGroupMethod(GroupedMethod):
    """Base of the members of the "gradient" share group; each member turns a ``GradientPass``
    into its map with ``from_pass``."""

    family = "gradient"
    share_group = "gradient"
    uses_input_grad: ClassVar[bool] = True

    @dataclass
    class Params:
        pass

    def from_pass(self, p: GradientPass) -> Tensor:
        raise NotImplementedError

    @classmethod
    def attribute_group(
        cls, methods: Sequence[Method], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        members: list[GradientGroupMethod] = list(methods)  # type: ignore[arg-type]
        # One pass per distinct CAM layer (normally one: ctx.layer); the input-gradient members
        # ride along with the first.
        by_layer: list[tuple[nn.Module | None, list[GradientGroupMethod]]] = []
        for m in (m for m in members if m.needs_layer):
            layer = m.layer_module(model, ctx)
            same = [grp for lay, grp in by_layer if lay is layer]
            if same:
                same[0].append(m)
            else:
                by_layer.append((layer, [m]))
        plain = [m for m in members if not m.needs_layer]
        passes = by_layer or [(None, [])]
        passes[0] = (passes[0][0], plain + passes[0][1])
        out: dict[str, Tensor] = {}
        for layer, group in passes:
            need_input = any(m.uses_input_grad for m in group)

            def one(sl: slice, layer=layer, group=group, need_input=need_input) -> Tensor:
                p = gradient_pass(model, x[sl], target[sl], ctx, input_grad=need_input, layer=layer)
                return torch.stack([m.from_pass(p) for m in group], dim=1)

            maps = run_in_chunks(one, x.shape[0], ctx)
            out.update({m.name: maps[:, k] for k, m in enumerate(group)})
        return {m.name: out[m.name] for m in members}

    def layer_module(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The module a CAM member hooks: its ``layer`` parameter if set, else ``ctx.layer``."""
        name = getattr(self.params, "layer", None)
        if name:
            return resolve_layer(model, name)
        if ctx.layer is None:
            raise ValueError(f"{self.name} needs a layer: set ctx.layer (see resolve_layer) or the 'layer' parameter")
        return ctx.layer


@register
class Saliency(GradientGroupMethod):
    """Gradient magnitude: max over channels of |d f_target / d x| (Simonyan et al. 2014)."""

    name = "saliency"
    compile_safe = True
    signed = False
    channel_rule = "max over channels of the absolute gradient"

    def from_pass(self, p: GradientPass) -> Tensor:
        return self.from_gradient(p.input_grad, p.x)  # type: ignore[arg-type]

    @staticmethod
    def from_gradient(grad: Tensor, x: Tensor) -> Tensor:
        return grad.abs().amax(dim=1)


@register
class GradientXInput(Saliency):
    """Gradient times input, summed over channels (signed)."""

    name = "gradient_x_input"
    signed = True
    channel_rule = "sum over channels"

    @staticmethod
    def from_gradient(grad: Tensor, x: Tensor) -> Tensor:
        return (grad * x).sum(dim=1)


def upsample_to(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres (``align_corners=False``), the
    interpolation Captum's ``LayerAttribution.interpolate`` and OpenCV's ``resize`` use."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


@register
class GradCAM(GradientGroupMethod):
    """Grad-CAM: ReLU of the activation weighted by its spatially averaged gradient."""

    name = "gradcam"
    compile_safe = False  # hooks the CAM layer
    signed = False
    needs_layer = True
    uses_input_grad = False
    channel_rule = "weighted sum over the CAM layer's channels (input channels never enter)"

    @dataclass
    class Params:
        #: dotted name of the module to hook; None: ctx.layer (by default the last spatial stage,
        #: or the first norm of a transformer's last block; see ``resolve_layer``)
        layer: str | None = None
        #: how the layer's output becomes (N, K, h, w) maps: "auto" (recognised from the shape),
        #: "nchw", "nhwc" (channels last, timm Swin), "tokens" ((N, T, C); leading class,
        #: distillation and register tokens inferred and dropped) or an integer: (N, T, C) with
        #: that many leading tokens dropped (see ``base.grid_layout``)
        reshape: Literal["auto", "nchw", "nhwc", "tokens"] | int = "auto"

        def validate(self) -> None:
            if isinstance(self.reshape, str) and self.reshape not in GRID_LAYOUTS:
                raise ValueError(f"reshape must be one of {list(GRID_LAYOUTS)} or a number of leading tokens")
            if isinstance(self.reshape, int) and self.reshape < 0:
                raise ValueError(f"reshape: a number of leading tokens must be >= 0, got {self.reshape}")

    def check_model(self, model: nn.Module, example: Tensor, ctx: Context) -> None:
        """The CAM layer (the ``layer`` parameter, else ``ctx.layer``, else the automatic choice)
        exists, runs in the model's forward, outputs one tensor, and that tensor maps to
        (N, K, h, w) feature maps with ``reshape``: one forward pass of ``example``."""
        name = self.params.layer
        try:
            layer = self.layer_module(model, ctx) if name or ctx.layer is not None else resolve_layer(model, None, example)
        except ValueError as exc:
            raise ModelCheckError(str(exc) if name else f"no layer given, and none found automatically: {exc}",
                                  "layer") from None
        layer_name = _module_name(model, layer)
        caught: list = []
        handle = layer.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            with torch.no_grad(), autocast_ctx(ctx, example.device):
                model(example)
        finally:
            handle.remove()
        if not caught:
            raise ModelCheckError(f"layer {layer_name!r} ({type(layer).__name__}) does not run in the model's forward "
                                  "pass, so it has no activation to weigh", "layer")
        if not isinstance(caught[-1], Tensor):
            raise ModelCheckError(f"layer {layer_name!r} ({type(layer).__name__}) outputs a {type(caught[-1]).__name__}, "
                                  "not one tensor; name a module that outputs the feature maps", "layer")
        try:
            layer_grid(caught[-1], self.params.reshape, example.shape[-2:], layer_name)
        except ValueError as exc:
            raise ModelCheckError(str(exc), "reshape" if self.params.reshape != "auto" else "layer") from None

    def from_pass(self, p: GradientPass) -> Tensor:
        act, grad = self.feature_maps(p)
        weights = self.channel_weights(act, grad)
        cam = torch.relu((weights[:, :, None, None] * act).sum(dim=1))
        return upsample_to(cam, tuple(p.x.shape[-2:]))

    def feature_maps(self, p: GradientPass) -> tuple[Tensor, Tensor]:
        """The layer's activation and its gradient as (N, K, h, w) maps, mapped alike."""
        try:
            layout = layer_grid(
                p.activation, self.params.reshape, p.x.shape[-2:], p.layer_name  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        return layout.apply(p.activation), layout.apply(p.activation_grad)  # type: ignore[arg-type]

    @staticmethod
    def channel_weights(act: Tensor, grad: Tensor) -> Tensor:
        """(N, K): the gradient averaged over the layer's positions."""
        return grad.mean(dim=(2, 3))

    def resolved_choices(self, model: nn.Module, x: Tensor, ctx: Context) -> dict[str, Any]:
        """The CAM layer this method hooks (its dotted name), how its output is read
        (``layout``: "nchw", "nhwc" or "tokens", with ``prefix_tokens`` dropped) and the grid
        (h, w) of the feature maps it weights, from one forward pass of ``x``."""
        layer = self.layer_module(model, ctx)
        name = _module_name(model, layer)
        caught: list[Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            handle.remove()
        if not caught or not isinstance(caught[-1], Tensor):
            raise ValueError(f"{self.name}: the CAM layer {name!r} was not called by the model's forward, "
                             "or does not output one tensor")
        try:
            layout = layer_grid(caught[-1], self.params.reshape, x.shape[-2:], name)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        grid = layout.apply(caught[-1]).shape[-2:]
        out: dict[str, Any] = {"layer": name, "layout": layout.kind, "grid": [int(grid[0]), int(grid[1])]}
        if layout.kind == "tokens":
            out["prefix_tokens"] = int(layout.prefix)
        return out


@register
class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++: channel weights from positive gradients weighted by the closed-form alphas."""

    name = "gradcam_pp"

    #: added to the alphas' denominator; pytorch-grad-cam's value, so that both agree
    EPS: ClassVar[float] = 1e-6

    @staticmethod
    def channel_weights(act: Tensor, grad: Tensor) -> Tensor:
        # Chattopadhay et al. eq. 19 with the exponential's derivatives written out:
        # alpha = g^2 / (2 g^2 + sum_ab(A) g^3); alpha = 0 where g = 0.
        g2 = grad * grad
        total = act.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g2 * grad + GradCAMPlusPlus.EPS)
        alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
        return (torch.relu(grad) * alpha).sum(dim=(2, 3))


# --------------------------------------------------------------------------------------------
# Guided backpropagation
# --------------------------------------------------------------------------------------------


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, and only where the input was > 0."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return grad_out.clamp(min=0) * (out > 0).to(grad_out.dtype)


_RELU_FUNCTIONS = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, torch.Tensor.relu}
)

#: other rectifier-like activations (by the name their torch function has; ReLU6 runs as
#: hardtanh): a model using these instead of ReLUs would get no guidance at all
_OTHER_RECTIFIERS = frozenset(
    {"gelu", "silu", "mish", "elu", "celu", "selu", "leaky_relu", "prelu", "rrelu", "relu6", "hardtanh",
     "hardswish", "softplus"}
)


#: the activation modules of those rectifiers, named in the refusal by their class
_RECTIFIER_MODULES = (nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.PReLU, nn.RReLU,
                      nn.Hardtanh, nn.Hardswish, nn.Softplus)


class _GuidedReLUMode(TorchFunctionMode):
    """Watches the activations called while active and, with ``guide=True``, routes every ReLU call
    (``nn.ReLU`` modules call ``F.relu`` too) through ``_GuidedReLU``. In-place calls become
    out-of-place: the returned tensor is right, but a caller relying on the side effect alone
    (ignoring the return value) would see the input unchanged.

    Counts ``relus`` (ReLU calls) and ``others`` (calls of other rectifiers, by name)."""

    def __init__(self, guide: bool = True):
        super().__init__()
        self.guide = guide
        self.relus = 0
        self.others: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELU_FUNCTIONS:
            self.relus += 1
            if self.guide:
                return _GuidedReLU.apply(args[0])
        else:
            name = getattr(func, "__name__", "").rstrip("_")
            if name in _OTHER_RECTIFIERS:
                self.others[name] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class GuidedCount:
    """What one guided forward pass met: ReLUs guided, ReLUs left plain, other rectifiers."""

    guided: int = 0
    plain_relus: int = 0
    others: Counter[str] = dataclasses.field(default_factory=Counter)


@contextlib.contextmanager
def guided_relus(model: nn.Module, which: str) -> Iterator[GuidedCount]:
    """Make the model's ReLUs guided while the context is open; yields a ``GuidedCount`` filled
    in as the forward runs.

    ``which="modules"``: only ``nn.ReLU`` modules (a forward hook swaps their output for a guided
    ReLU of their input), which is what Captum's GuidedBackprop covers. ``which="all"``: also
    ``F.relu``/``torch.relu``/``Tensor.relu`` called inside ``forward`` (a TorchFunctionMode)."""
    count = GuidedCount()
    mode = _GuidedReLUMode(guide=which == "all")
    modules = [0]

    def swap(_module, inputs, _output):
        # In-place ReLU: inputs[0] already holds relu(x); relu of it is the same values and the
        # same (x > 0) mask, so recomputing from it is exact in both cases.
        modules[0] += 1
        return _GuidedReLU.apply(inputs[0])

    relus = [] if which == "all" else [m for m in model.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(swap) for m in relus]
    try:
        with mode:
            yield count
    finally:
        for h in handles:
            h.remove()
        count.guided = mode.relus if which == "all" else modules[0]
        count.plain_relus = 0 if which == "all" else mode.relus - modules[0]
        count.others = mode.others


@register
class GuidedBackprop(Method):
    """Guided backpropagation: the gradient with negative gradients stopped at every ReLU."""

    name = "guided_backprop"
    family = "gradient"
    signed = True
    channel_rule = "sum over channels"

    @dataclass
    class Params:
        #: "all": nn.ReLU modules and functional relu calls; "modules": nn.ReLU modules only
        #: (Captum's GuidedBackprop; a model calling F.relu keeps plain ReLU gradients there)
        relu: Literal["all", "modules"] = "all"

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        return self.attribute_full(model, x, target, ctx).sum(dim=1)

    def check_model(self, model: nn.Module, example: Tensor, ctx: Context) -> None:
        """The model's forward runs ReLUs this method guides (``check_guided``): one guided forward
        pass of ``example``, no backward."""
        with torch.no_grad(), autocast_ctx(ctx, example.device):
            with guided_relus(model, self.params.relu) as count:
                model(example)
        try:
            self.check_guided(count, model)
        except ValueError as exc:
            # relu='all' would guide functional ReLUs; no setting guides other rectifiers
            raise ModelCheckError(str(exc), "relu" if count.plain_relus and not count.others else None) from None

    def check_guided(self, count: GuidedCount, model: nn.Module | None = None) -> None:
        """Refuse a forward that guided no ReLU but ran ReLUs this setting leaves plain or other
        rectifiers (a GELU ViT): the map would silently be the plain gradient. A model with no
        rectifier at all (linear, tanh) is left alone: there, the definition gives the gradient.
        ``model``: named in the message by the kinds of its activation modules."""
        if count.guided or not (count.plain_relus or count.others):
            return
        found = [f"{name} x {k}" for name, k in sorted(count.others.items())]
        modules = ""
        if model is not None:
            kinds = Counter(type(m).__name__ for m in model.modules() if isinstance(m, _RECTIFIER_MODULES))
            if kinds:
                modules = ". The model's activation modules: " + ", ".join(f"{k} x {v}" for k, v in sorted(kinds.items()))
        if count.plain_relus:
            found.insert(0, f"functional relu x {count.plain_relus} (guided by relu='all' only)")
        covers = ("nn.ReLU modules and F.relu/torch.relu/Tensor.relu calls" if self.params.relu == "all"
                  else "nn.ReLU modules only")
        raise ValueError(
            f"{self.name}: the model's forward ran no ReLU it can guide (relu={self.params.relu!r}: {covers}); "
            f"it ran {', '.join(found)}. Guided backpropagation changes the backward pass of ReLUs only, "
            f"so on this model it would return the plain input gradient{modules}"
        )

    def attribute_full(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        """The guided gradient (N, C, H, W) before the channel reduction."""

        def one(sl: slice) -> Tensor:
            dtype = working_dtype(x)
            xi = x[sl].detach().to(dtype).requires_grad_(True)
            with torch.enable_grad(), autocast_ctx(ctx, xi.device):
                with guided_relus(model, self.params.relu) as count:
                    out = model(xi)
                score = select_scores(out, target[sl].to(out.device)).to(dtype).sum()
            self.check_guided(count, model)
            (grad,) = torch.autograd.grad(score, xi)
            return grad.to(dtype)

        return run_in_chunks(one, x.shape[0], ctx)
