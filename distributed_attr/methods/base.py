"""The contract every attribution method follows, and the helpers they share.

A method is a pure, batched tensor function: ``(model, x (N,C,H,W), target (N,), ctx) -> (N,H,W)``.
It never touches files. Everything a method needs besides the images arrives in ``Context``:
the seed and the images' global indices (randomness is drawn per image, so a unit retried on
another actor with another batch composition reproduces its maps bit for bit), the layer for CAM
methods, the number of samples one forward pass may hold, and the autocast dtype.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from ..registry import Registry, build_params, describe_params

METHODS: Registry["Method"] = Registry("method")


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator adding a method to the registry."""
    return METHODS.register(cls)


@dataclass
class Context:
    """What a method may use besides the model, the images and the targets."""

    seed: int = 0
    #: global dataset index of every image of the batch (N,), int64; defaults to 0..N-1
    indices: Tensor | None = None
    #: the module CAM methods hook; resolved by the caller (see ``resolve_layer``)
    layer: nn.Module | None = None
    #: most samples one forward/backward pass may hold (steps x images, masks x images, ...)
    max_batch: int = 256
    #: ``torch.bfloat16`` / ``torch.float16`` to run the model under autocast, or None
    autocast: torch.dtype | None = None
    #: reference images for methods that need other natural images (Soundness Saliency)
    references: Tensor | None = None

    def indices_for(self, n: int) -> Tensor:
        if self.indices is None:
            return torch.arange(n, dtype=torch.int64)
        return self.indices.detach().to("cpu", torch.int64)


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
# Shared helpers
# --------------------------------------------------------------------------------------------


def image_seed(seed: int, method: str, index: int) -> int:
    """A 63-bit seed from (global seed, method name, image index), stable across runs and hosts."""
    digest = hashlib.blake2b(f"{seed}/{method}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def per_image_generators(seed: int, method: str, indices: Tensor) -> list[torch.Generator]:
    """One CPU generator per image. Draws happen on the CPU and move to the device afterwards, so
    that the numbers do not depend on the device or on which other images share the batch."""
    gens = []
    for idx in indices.tolist():
        g = torch.Generator(device="cpu")
        g.manual_seed(image_seed(seed, method, int(idx)))
        gens.append(g)
    return gens


def per_image_rand(
    gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device, dtype=torch.float32
) -> Tensor:
    """``(N, *shape)`` uniform [0, 1) draws, image i drawn from ``gens[i]``."""
    out = torch.stack([torch.rand(tuple(shape), generator=g, dtype=dtype) for g in gens])
    return out.to(device)


def per_sample_seeds(gens: Sequence[torch.Generator], n: int) -> Tensor:
    """``(N, n)`` int64 seeds, one per (image, sample), drawn from the per-image generators.

    Methods that draw a large tensor per sample (SmoothGrad's noise) seed one generator per
    sample from these instead of drawing everything up front: memory stays one chunk's worth, and
    a chunk retried after an out-of-memory error redraws exactly the same numbers."""
    return torch.stack([torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64) for g in gens])


def sample_randn(seed: int, shape: Sequence[int], dtype=torch.float32) -> Tensor:
    """Standard normal draws of ``shape`` from a CPU generator seeded with ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=dtype)


def working_dtype(x: Tensor) -> torch.dtype:
    """float64 inputs (tests against references) stay float64; everything else runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def output_scores(out: Tensor, target: Tensor, output: str = "logit") -> Tensor:
    """``out[i, target[i]]`` as float32 (or float64), after a softmax when ``output`` is
    "probability"."""
    out = out.double() if out.dtype == torch.float64 else out.float()
    if output == "probability":
        out = torch.softmax(out, dim=1)
    elif output != "logit":
        raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")
    return select_scores(out, target)


def autocast_ctx(ctx: Context, device: torch.device):
    """Autocast when asked for, a no-op otherwise."""
    if ctx.autocast is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=ctx.autocast)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_in_chunks(fn: Callable[[slice], Tensor], n: int, ctx: Context) -> Tensor:
    """Run ``fn`` over ``n`` samples in slices of at most ``ctx.max_batch``, concatenating the
    results. On a CUDA out-of-memory error the slice size halves and the work goes on; the new
    size sticks in ``ctx.max_batch`` for the rest of the job."""
    outs: list[Tensor] = []
    start = 0
    while start < n:
        size = max(1, ctx.max_batch)
        sl = slice(start, min(n, start + size))
        try:
            outs.append(fn(sl))
        except RuntimeError as exc:
            if not is_oom(exc) or size == 1:
                raise
            torch.cuda.empty_cache()
            ctx.max_batch = max(1, size // 2)
            continue
        start = sl.stop
    return torch.cat(outs) if outs else torch.empty(0)


def select_scores(logits: Tensor, target: Tensor) -> Tensor:
    """``logits[i, target[i]]`` as a vector."""
    return logits.gather(1, target.view(-1, 1).to(logits.device)).squeeze(1)


def forward_probabilities(model: nn.Module, x: Tensor, ctx: Context) -> Tensor:
    """Softmax over classes for a batch of any size without gradients, chunked."""

    def one(sl: slice) -> Tensor:
        with torch.no_grad(), autocast_ctx(ctx, x.device):
            return torch.softmax(model(x[sl]).float(), dim=1)

    return run_in_chunks(one, x.shape[0], ctx)


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
