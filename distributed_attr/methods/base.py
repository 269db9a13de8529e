"""The contract every attribution method follows, and the helpers they share.

A method is a pure, batched tensor function: ``(model, x (N,C,H,W), target (N,), ctx) -> (N,H,W)``.
It never touches files. Everything a method needs besides the images arrives in ``Context``:
the seed and the images' global indices (randomness is drawn per image, so a unit retried on
another actor with another batch composition reproduces its maps bit for bit), the layer for CAM
methods, the number of samples one forward pass may hold, and the autocast dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..commons import (  # noqa: F401  (re-exported: the helpers methods share with metrics)
    BatchContext,
    ModelCheckError,
    autocast_ctx,
    for_each_chunk,
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
from ..registry import Configurable, Registry

METHODS: Registry["Method"] = Registry("method", group="distributed_attr.methods")


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator adding a method to the registry."""
    return METHODS.register(cls)


@dataclass(frozen=True)
class Context(BatchContext):
    """What a method may use besides the model, the images and the targets: the batch's seed,
    indices, budget and autocast (``BatchContext``), plus what methods alone need."""

    #: the module CAM methods hook; resolved by the caller (see ``resolve_layer``)
    layer: nn.Module | None = None
    #: reference images for methods that need other natural images (Soundness Saliency)
    references: Tensor | None = None


class Method(Configurable):
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
    compile_safe: whether ``run.compile`` may hand the method a compiled model.
    channel_rule: how the map is reduced over channels (documented in docs/methods.md).
    """

    section: ClassVar[str] = "methods"
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
    #: whether the method only calls the model (no hooks on its layers, no rewritten functions),
    #: so that it may be given the ``torch.compile``d model (``run.compile``); a method that hooks
    #: layers would see the hooks ignored or force recompiles, so the default is no
    compile_safe: ClassVar[bool] = False

    def cost(self) -> float:
        """Forward+backward passes per image (1 for the plain gradient)."""
        return 1.0

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Why the method cannot run on ``model`` (read from its modules, no forward), or None:
        every model, unless the method applies to some architectures only (attention methods)."""
        return None

    def check_model(self, model: nn.Module, example: Tensor, ctx: Context) -> None:
        """Check, before any work starts, that this method's parameters fit ``model``: a layer it
        names exists and gives what the method needs, the model has the modules the method
        rewrites. ``example`` is one preprocessed image (1, C, H, W) of the dataset (at most a
        forward and a backward pass of it); ``ctx`` is the job's context for it (``ctx.layer``: the
        CAM layer the job resolved, when one is needed). Raises ``ModelCheckError`` naming the
        parameter at fault. The driver calls it on its probe model before it creates the store, so
        a mistake costs no store and no ``--overwrite``. Default: nothing to check."""
        return None

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    @classmethod
    def attribute_group(
        cls, methods: Sequence["Method"], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        """Compute several methods of one ``share_group`` at once; default: one by one."""
        return {m.name: m.attribute(model, x, target, ctx) for m in methods}

    def resolved_choices(self, model: nn.Module, x: Tensor, ctx: Context) -> dict[str, Any]:
        """What this method will use on ``model`` that its parameters leave to be found (a CAM
        layer's grid, LRP's canonizer, the attention's token grid), as plain JSON values; ``x``:
        one example image (1, C, H, W) of the job's size, ``ctx.layer``: the batch context's CAM
        layer. Default: nothing to report. ``methods.choices.resolve_choices`` collects them."""
        return {}

    DESCRIBED: ClassVar[tuple[str, ...]] = ("family", "signed", "needs_layer", "needs_references", "compile_safe",
                                            "share_group", "channel_rule", "cost_unit")


# --------------------------------------------------------------------------------------------
# Helpers of the methods alone (those shared with metrics live in ``distributed_attr.commons``)
# --------------------------------------------------------------------------------------------


#: the ways a CAM layer's output becomes (N, K, h, w) feature maps (the CAM methods' ``reshape``
#: parameter also takes an integer: the number of leading tokens to drop)
class GroupedMethod(Method):
    """A method computed together with the other members of its ``share_group`` (one backward
    pass, one set of noisy copies, ...): subclasses implement ``attribute_group``; one method
    alone is a group of one."""

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        return self.attribute_group([self], model, x, target, ctx)[self.name]

    @classmethod
    def attribute_group(
        cls, methods: Sequence["Method"], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        raise NotImplementedError(f"{cls.__name__} must implement attribute_group")


@dataclass
class NoisySampleParams:
    """``samples`` noisy copies per image, Gaussian noise of std ``noise_level`` x the image's
    value range (max - min): SmoothGrad's parameters, shared by the methods that add such noise."""

    samples: int = 50
    noise_level: float = 0.15

    def validate(self) -> None:
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.noise_level < 0:
            raise ValueError("noise_level must be >= 0")


GRID_LAYOUTS = ("auto", "nchw", "nhwc", "tokens")
#: most leading (class, distillation, register) tokens "auto" and "tokens" look for; a model with
#: more names the count in ``reshape``
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class GridLayout:
    """How one layer output maps to (N, K, h, w): ``kind`` "nchw" (as is), "nhwc" (channels
    last, permuted) or "tokens" ((N, T, C): the first ``prefix`` tokens dropped, the other h * w
    tokens laid out row by row on the ``grid`` (h, w), channels moved first)."""

    kind: str
    prefix: int = 0
    grid: tuple[int, int] | None = None

    def apply(self, t: Tensor) -> Tensor:
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        h, w = self.grid  # type: ignore[misc]
        return t[:, self.prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def _strides(n: int, size: int) -> set[int]:
    """Integer strides s that turn ``size`` pixels into ``n`` positions (floor or ceil of size / s,
    the two roundings convolutions and patch embeddings use)."""
    if n < 1:
        return set()
    lo, hi = max(1, size // (n + 1)), size // max(n - 1, 1) + 1
    return {s for s in range(lo, hi + 1) if n in (size // s, -(-size // s))}


def grid_fits(h: int, w: int, height: int, width: int) -> bool:
    """Whether an h x w grid with h * w > 1 can be the image (height x width) seen with one
    integer stride: what a patch embedding or a stack of strided layers produces. A square image
    gives a square grid."""
    if h * w < 2 or (height == width and h != w):
        return False
    return bool(_strides(h, height) & _strides(w, width))


def _token_grid(tokens: int, height: int, width: int, prefix: int | None) -> tuple[int, tuple[int, int]] | None:
    """(prefix, (h, w)): the fewest leading tokens (or exactly ``prefix``) whose removal leaves a
    grid that fits the image; among grids of the same size, the one nearest the image's aspect."""
    counts = [prefix] if prefix is not None else range(min(MAX_PREFIX_TOKENS, tokens - 2) + 1)
    for p in counts:
        n = tokens - p
        pairs = {(h, n // h) for h in range(1, math.isqrt(n) + 1) if n % h == 0}
        pairs |= {(w, h) for h, w in pairs}
        grids = [g for g in sorted(pairs) if grid_fits(g[0], g[1], height, width)]
        if grids:
            return p, min(grids, key=lambda g: abs(g[0] * width - g[1] * height))
    return None


def grid_layout(shape: Sequence[int], reshape: str | int, image_size: Sequence[int]) -> GridLayout:
    """How a layer output of ``shape`` maps to (N, K, h, w) feature maps for images of
    ``image_size`` (H, W), following the CAM methods' ``reshape`` parameter:

    - "auto": a 4-d output is (N, K, h, w), unless only its channels-last reading (N, h, w, C)
      fits the image (timm's Swin stages); a 3-d output (N, T, C) is a token sequence, as "tokens".
    - "nchw" / "nhwc": a 4-d output, channels first / channels last.
    - "tokens": (N, T, C); the leading non-patch tokens (class, distillation, register) are the
      fewest, at most ``MAX_PREFIX_TOKENS``, that leave a grid fitting the image (for a square
      image: a square number of patch tokens). 197 tokens at 224 px: 1 dropped, 14 x 14.
    - an integer p: (N, T, C) with exactly p leading tokens dropped.

    Raises ``ValueError`` saying why the shape does not map."""
    shape, (height, width) = tuple(int(d) for d in shape), (int(image_size[0]), int(image_size[1]))
    dims = len(shape)
    if dims == 4 and reshape in ("auto", "nchw", "nhwc"):
        if reshape == "auto":
            channels_last = grid_fits(shape[1], shape[2], height, width) and not grid_fits(
                shape[2], shape[3], height, width
            )
            return GridLayout("nhwc" if channels_last else "nchw")
        return GridLayout(str(reshape))
    if dims == 3 and (reshape in ("auto", "tokens") or isinstance(reshape, int)):
        prefix = None if isinstance(reshape, str) else int(reshape)
        if prefix is not None and not 0 <= prefix < shape[1]:
            raise ValueError(f"reshape={prefix} leading tokens, but the layer outputs {shape[1]} tokens")
        found = _token_grid(shape[1], height, width, prefix)
        if found is None and prefix is not None:
            raise ValueError(
                f"the {shape[1] - prefix} tokens after the first {prefix} do not form a grid that fits "
                f"the {height} x {width} image"
            )
        if found is None:
            raise ValueError(
                f"no count of at most {MAX_PREFIX_TOKENS} leading tokens leaves patch tokens that form a "
                f"grid fitting the {height} x {width} image; give the number of leading tokens as reshape"
            )
        return GridLayout("tokens", found[0], found[1])
    if reshape == "auto":
        wants = "a 4-d feature map or a 3-d (N, T, C) token sequence"
    elif reshape in ("nchw", "nhwc"):
        wants = f"a 4-d ({'N, K, h, w' if reshape == 'nchw' else 'N, h, w, C'}) output"
    else:
        wants = "a 3-d (N, T, C) token output"
    raise ValueError(f"reshape={reshape!r} needs {wants}")


def layer_grid(output: Tensor, reshape: str | int, image_size: Sequence[int], layer_name: str) -> GridLayout:
    """``grid_layout`` for one CAM layer's output, with an error naming the layer and its shape."""
    try:
        return grid_layout(output.shape, reshape, image_size)
    except ValueError as exc:
        raise ValueError(
            f"the output of CAM layer {layer_name!r}, shape {tuple(output.shape)}, cannot be mapped to "
            f"(N, K, h, w) feature maps: {exc}. Set 'reshape' (one of {list(GRID_LAYOUTS)} or a number of "
            "leading tokens) or name another 'layer'"
        ) from None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm")


def layer_candidates(model: nn.Module, layer: str, shown: int = 8) -> str:
    """What a user who named the missing module ``layer`` may have meant, for an error message: the
    names nearest it, the children of its deepest existing parent, and the last convolutional and
    normalisation layers (where CAM layers usually are), each list cut to ``shown`` names."""
    import difflib

    names = [n for n, _ in model.named_modules() if n]

    def cut(items: list[str], last: bool = False) -> str:
        if len(items) <= shown:
            return str(items)
        part = items[-shown:] if last else items[:shown]
        return f"{part} ({'the last' if last else 'the first'} {shown} of {len(items)})"

    parts = []
    near = difflib.get_close_matches(layer, names, n=3, cutoff=0.8)
    if near:
        parts.append(f"nearest names: {near}")
    parent = layer
    while "." in parent:
        parent = parent.rpartition(".")[0]
        try:
            found = model.get_submodule(parent)
        except AttributeError:
            continue
        kids = [f"{parent}.{k}" for k, _ in found.named_children()]
        parts.append(f"{parent!r} has {cut(kids)}" if kids else f"{parent!r} has no submodules")
        break
    else:
        parts.append(f"the model's top-level modules: {cut([k for k, _ in model.named_children()])}")
    convs = [n for n, m in model.named_modules() if n and isinstance(m, nn.modules.conv._ConvNd)]
    if convs:
        parts.append(f"convolutional layers: {cut(convs, last=True)}")
    else:
        norms = [n for n, m in model.named_modules() if n and _is_norm(m)]
        if norms:
            parts.append(f"normalisation layers: {cut(norms, last=True)}")
    return "; ".join(parts)


def trace_modules(model: nn.Module, example: Tensor, after: Callable[[str], Callable],
                  before: Callable[[str], Callable] | None = None) -> None:
    """One forward pass of ``example[:1]`` without gradients, with the hooks ``after(name)`` (and
    ``before(name)``) make on every named submodule; the hooks are removed afterwards."""
    handles = []
    for n, m in model.named_modules():
        if n:
            if before is not None:
                handles.append(m.register_forward_pre_hook(before(n)))
            handles.append(m.register_forward_hook(after(n)))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()


def resolve_layer(model: nn.Module, layer: str | None, example: Tensor | None = None) -> nn.Module:
    """The module CAM methods hook: ``layer`` by dotted name, or else found by one forward pass of
    ``example`` (one image) among the modules whose output maps to a grid (``grid_layout`` with
    "auto": spatial maps (N, C, h, w) with h*w > 1, channels-last grids, token sequences):

    - when the last of them is a spatial map (N, C, h, w) (a CNN), that module: forward hooks fire
      inner-first, so "last to fire" picks the outermost stage that ends the convolutional trunk
      (``layer4`` of a ResNet, ``features`` of a VGG), the layer Grad-CAM's reference
      implementations use;
    - when it is a token sequence or a channels-last grid (a transformer), the first
      normalisation layer of the last block: the last normalisation module that runs first in its
      parent module (torchvision ViT ``encoder.layers[-1].ln_1``, timm ViT/DeiT
      ``blocks[-1].norm1``, timm Swin ``layers[-1].blocks[-1].norm1``), pytorch-grad-cam's
      documented choice. Not the last block's output: the classifier reads only the class (and
      distillation) token of it, so its patch tokens get zero gradient and the map is zero
      everywhere; the last block's first norm feeds the attention in which the class token reads
      the patch tokens, the deepest point where they still reach the output. Never the patch
      embedding. A transformer without such a block is an error asking for ``layer``."""
    if layer:
        try:
            return model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"layer {layer!r} is not a submodule of the model; {layer_candidates(model, layer)}") from None
    if example is None:
        raise ValueError("resolving the CAM layer automatically needs an example input")
    size = tuple(example.shape[-2:])
    #: (name, module, layout, runs first in its parent), in the order the modules finished
    found: list[tuple[str, nn.Module, GridLayout, bool]] = []
    last_started = [""]  # the root module (not hooked) starts first
    pending: dict[int, list[bool]] = {}

    def before(name: str):
        def hook(module, _inputs):
            pending.setdefault(id(module), []).append(last_started[0] == name.rpartition(".")[0])
            last_started[0] = name

        return hook

    def after(name: str):
        def hook(module, _inputs, output):
            first = pending[id(module)].pop() if pending.get(id(module)) else False
            if not isinstance(output, Tensor) or output.dim() not in (3, 4):
                return
            try:
                lay = grid_layout(output.shape, "auto", size)
            except ValueError:
                return
            if lay.kind == "nchw" and output.shape[-1] * output.shape[-2] <= 1:
                return
            found.append((name, module, lay, first))

        return hook

    trace_modules(model, example, after, before)
    if not found:
        raise ValueError(
            "no module outputs a spatial feature map, a channels-last grid or a token sequence; "
            "name the CAM layer with 'layer'"
        )
    name, module, lay, _ = found[-1]
    if lay.kind == "nchw":
        return module
    pre_norms = [m for _n, m, _lay, first in found if first and _is_norm(m)]
    if not pre_norms:
        raise ValueError(
            f"the model ends in a {'token sequence' if lay.kind == 'tokens' else 'channels-last grid'} "
            f"(layer {name!r}) but no block starting with a normalisation layer was found; name the "
            "CAM layer with 'layer' (e.g. the first LayerNorm of the last block)"
        )
    return pre_norms[-1]


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    return METHODS.get(name)(**(params or {}))
