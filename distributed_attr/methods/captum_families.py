"""Captum's DeepLIFT, SHAP, LIME, feature-ablation and Shapley-sampling families, run through
Captum itself (not rewritten) under this package's method contract.

Seven registered methods: ``deeplift``, ``deeplift_shap``, ``gradient_shap`` (gradient family:
the map is Captum's (N, C, H, W) attribution summed over channels, like ``integrated_gradients``)
and ``kernel_shap``, ``lime``, ``feature_ablation``, ``shapley_value_sampling`` (prediction
family: the features are square superpixels, all channels perturbed together, so Captum's
per-channel maps are equal and channel 0 is the map, like ``occlusion``).

What the bridge adds to Captum:

- **Superpixels.** The perturbation families take a ``feature_mask`` built by ``patch_mask``: a
  grid of ``patch`` x ``patch`` squares from the top-left corner, row-major, the last row and
  column cropped at the border; ceil(H / patch) x ceil(W / patch) features.
- **Baselines** use the vocabulary of ``integrated_gradients`` and ``occlusion``: ``baseline``, a
  constant in the model's (normalised) input space. The SHAP estimators that average over a
  background distribution (``deeplift_shap``, ``gradient_shap``) take it from ``ctx.references``
  (other images of the dataset, loaded by the pipeline: ``needs_references``).
- **Per-image seeding.** Captum draws from the global generators (torch's CPU generator for
  LIME's and Kernel SHAP's coalitions and for the Shapley permutations; numpy's for Gradient
  SHAP's baselines and path points; the device's torch generator for Gradient SHAP's noise). The
  stochastic methods call Captum once per image inside ``seeded_global_rng``, which forks those
  generators and seeds them with ``image_seed(ctx.seed, name, global index)``, then restores
  them. An image's map therefore does not depend on its batch, on the chunking or on retries,
  and equals Captum's own result on that image after the same seeding. The global generators are
  process-wide: do not draw from them in another thread while a map is computed.
- **Batching.** ``deeplift`` and ``feature_ablation`` are deterministic and batched (several
  images per Captum call, ``perturbations_per_eval`` for the ablation), each pass holding at most
  ``ctx.max_batch`` samples. The per-image calls bound their passes with
  ``perturbations_per_eval = min(samples, ctx.max_batch)`` (LIME, Kernel SHAP, Shapley sampling;
  this does not change the draws) or by splitting Captum's gradient computation into chunks
  (Gradient SHAP, through its ``gradient_func``). A CUDA out-of-memory error halves
  ``ctx.max_batch`` and redoes the chunk or image, with the same draws (DeepLiftShap's pass, an
  image with its backgrounds, does not shrink with the budget: it raises at once).
- **Outputs.** Gradient methods differentiate the target logit (Captum's convention); the
  perturbation families have ``output: "logit" | "probability"`` like ``occlusion``. Forwards run
  under ``ctx.autocast``, except DeepLIFT's (Captum's rule hooks fail under autocast: it runs in
  the working dtype and warns); the perturbation forwards run without autograd.

DeepLIFT works on ``nn.Module`` activations only (a known Captum limitation): Captum hooks the
modules of ``captum.attr._core.deep_lift.SUPPORTED_NON_LINEAR`` (``nn.ReLU``, ``nn.ELU``,
``nn.LeakyReLU``, ``nn.Sigmoid``, ``nn.Tanh``, ``nn.Softplus``, ``nn.MaxPoolNd``, ``nn.Softmax``).
A nonlinearity called as a function (``F.relu``, ``torch.relu``, ``x.relu()``, ``torch.sigmoid``,
``F.max_pool2d``, ...) or an activation module outside that list (``nn.GELU``, ``nn.SiLU``,
``nn.ReLU6``, ...) keeps its plain gradient: the map is then not DeepLIFT's and no longer sums to
f(x) - f(baseline). ``deeplift`` and ``deeplift_shap`` find such calls with one probe forward of
one image per model (``unhooked_nonlinearities``) and warn. A supported module called more than
once per forward (torchvision's ResNet blocks reuse ``self.relu``) makes Captum fail; the probe
raises a ``ValueError`` naming it first.
"""
from __future__ import annotations

import contextlib
import math
import random
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import (
    BatchContext,
    Context,
    Method,
    ModelCheckError,
    NoisySampleParams,
    autocast_ctx,
    image_seed,
    is_oom,
    per_image_generators,
    register,
    run_in_chunks,
    working_dtype,
)

Output = Literal["logit", "probability"]

# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def patch_count(height: int, width: int, patch: int) -> int:
    """Number of superpixels of ``patch_mask``: ceil(H / patch) x ceil(W / patch)."""
    return math.ceil(height / patch) * math.ceil(width / patch)


def patch_mask(height: int, width: int, patch: int, device: Any = None) -> Tensor:
    """(H, W) int64 superpixel index of every pixel: squares of ``patch`` px from the top-left
    corner, numbered row-major; the last row and column of squares are cropped at the border."""
    per_row = math.ceil(width / patch)
    rows = torch.arange(height, device=device) // patch
    cols = torch.arange(width, device=device) // patch
    return rows.view(-1, 1) * per_row + cols.view(1, -1)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Fork the global generators Captum draws from (torch CPU, torch on ``device`` if CUDA,
    numpy, Python's ``random``), seed them all from ``seed``, and restore them on exit."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def each_image(fn: Callable[[int], Tensor], n: int, ctx: BatchContext) -> Tensor:
    """``fn(i)`` for every image, stacked. On a CUDA out-of-memory error the budget halves (the
    per-image calls read ``ctx.max_batch`` for their pass size) and the image is done again."""
    outs = []
    for i in range(n):
        while True:
            try:
                outs.append(fn(i))
                break
            except RuntimeError as exc:
                if not is_oom(exc) or ctx.max_batch <= 1:
                    raise
                torch.cuda.empty_cache()
                ctx.budget.lower_after_oom(ctx.max_batch)
    return torch.stack(outs)


def run_in_image_chunks(fn: Callable[[slice], Tensor], n: int, ctx: BatchContext, per_image: int) -> Tensor:
    """``run_in_chunks`` over images when each image puts ``per_image`` samples into a pass:
    chunks of max(1, max_batch // per_image) images; an out-of-memory halving carries over."""
    return run_in_chunks(fn, n, BatchContext(budget=ctx.budget.per(per_image)))


def forward_scores(model: nn.Module, ctx: Context, dtype: torch.dtype, output: str = "logit", grad: bool = False):
    """The forward function handed to Captum: the model under ``ctx.autocast``, outputs in the
    working dtype, softmax for ``output="probability"``; without autograd unless ``grad``."""
    if output not in ("logit", "probability"):
        raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")

    def forward(inputs: Tensor) -> Tensor:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), autocast_ctx(ctx, inputs.device):
            out = model(inputs).to(dtype)
        return torch.softmax(out, dim=1) if output == "probability" else out

    return forward


@contextlib.contextmanager
def _quiet_captum() -> Iterator[None]:
    """Silence the notices Captum's DeepLIFT emits on every call (hooks set, inputs made to
    require gradients)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Setting forward, backward hooks")
        warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
        yield


def _references(ctx: Context, x: Tensor, name: str) -> Tensor:
    if ctx.references is None:
        raise ValueError(
            f"{name} needs background images: pass ctx.references (other images of the dataset; "
            "the pipeline loads run.references of them, attribute() takes references=)"
        )
    pool = ctx.references.detach().to(device=x.device, dtype=x.dtype)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"ctx.references must be (R, C, H, W) images shaped like the batch {tuple(x.shape[1:])}, "
            f"got {tuple(pool.shape)}"
        )
    return pool


# --------------------------------------------------------------------------------------------
# DeepLIFT's module-wise rules: which nonlinearities Captum cannot see
# --------------------------------------------------------------------------------------------

#: nonlinear functions; called outside a module Captum's DeepLIFT hooks, they keep plain gradients
_NONLINEAR_FUNCTIONS = {
    F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", Tensor.relu: "relu",
    Tensor.relu_: "relu", F.elu: "elu", F.leaky_relu: "leaky_relu", F.softplus: "softplus",
    torch.sigmoid: "sigmoid", Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", Tensor.tanh: "tanh", F.tanh: "tanh",
    F.softmax: "softmax", torch.softmax: "softmax", Tensor.softmax: "softmax",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    torch.max_pool1d: "max_pool", torch.max_pool2d: "max_pool", torch.max_pool3d: "max_pool",
    F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.hardtanh: "hardtanh", F.relu6: "relu6",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.selu: "selu", F.celu: "celu",
    F.prelu: "prelu", F.glu: "glu", F.logsigmoid: "logsigmoid", F.softsign: "softsign",
}


class _CountNonlinear(TorchFunctionMode):
    def __init__(self, depth: list[int]):
        super().__init__()
        self.depth = depth
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _NONLINEAR_FUNCTIONS.get(func)
        if name is not None and self.depth[0] == 0:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def unhooked_nonlinearities(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Nonlinearities that Captum's DeepLIFT leaves with plain gradients, found by one forward of
    ``example``: ``{"relu": 2, ...}`` for nonlinear functions called outside the modules it hooks
    (``F.relu`` and the like, ``nn.GELU``'s ``F.gelu``...). Raises ``ValueError`` if a hooked
    module runs more than once in the forward (Captum's DeepLIFT cannot handle reuse)."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    depth = [0]
    runs: dict[nn.Module, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def enter(module, _inputs):
        depth[0] += 1
        runs[module] = runs.get(module, 0) + 1

    def leave(_module, _inputs, _output):
        depth[0] -= 1

    hooked = [m for m in model.modules() if type(m) in SUPPORTED_NON_LINEAR]
    handles = [m.register_forward_pre_hook(enter) for m in hooked]
    handles += [m.register_forward_hook(leave) for m in hooked]
    mode = _CountNonlinear(depth)
    try:
        with torch.no_grad(), mode:
            model(example)
    finally:
        for h in handles:
            h.remove()
    reused = [f"{names.get(m) or '(model)'} ({type(m).__name__}) x{k}" for m, k in runs.items() if k > 1]
    if reused:
        raise ValueError(
            "Captum's DeepLIFT needs every nonlinear module to run once per forward; reused: "
            + ", ".join(reused) + ". Give each call its own module (torchvision's ResNet blocks reuse self.relu)"
        )
    return mode.calls


#: per model: the probe's result, so the probe runs once per model and process
_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def check_deeplift_model(model: nn.Module, example: Tensor, ctx: Context, name: str) -> None:
    """Probe the model once (cached) and warn about nonlinearities DeepLIFT's rules miss, and
    that ``ctx.autocast`` is not applied."""
    if ctx.autocast is not None:
        warnings.warn(
            f"{name}: runs without autocast ({ctx.autocast}): Captum's DeepLIFT rules fail under it "
            "(its backward hooks change the gradients' dtype)",
            stacklevel=3,
        )
    try:
        calls = _PROBED[model]
    except (KeyError, TypeError):
        calls = unhooked_nonlinearities(model, example)
        with contextlib.suppress(TypeError):
            _PROBED[model] = calls
    if calls:
        found = ", ".join(f"{k} x{v}" for k, v in sorted(calls.items()))
        warnings.warn(
            f"{name}: the model calls nonlinearities that Captum's DeepLIFT does not hook ({found}): they "
            "keep plain gradients, so the map is not DeepLIFT's and does not sum to f(x) - f(baseline). "
            "Write them as nn.ReLU / nn.Sigmoid / nn.Tanh / nn.MaxPool2d ... modules (one per call).",
            stacklevel=3,
        )


class _DeepLiftChecks:
    """``check_model`` of the DeepLIFT methods: the probe of ``check_deeplift_model`` run on the
    driver (its warnings shown when the job starts; a nonlinear module run twice refused)."""

    name: ClassVar[str]

    def check_model(self, model: nn.Module, example: Tensor, ctx: Context) -> None:
        try:
            check_deeplift_model(model, example.detach().to(working_dtype(example)), ctx, self.name)
        except ValueError as exc:
            raise ModelCheckError(f"{self.name}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Gradient family
# --------------------------------------------------------------------------------------------


@register
class DeepLift(_DeepLiftChecks, Method):
    """DeepLIFT (Rescale rule) through Captum's DeepLift, summed over channels."""

    name = "deeplift"
    family = "gradient"
    signed = True
    channel_rule = "sum over channels (keeps summation-to-delta: the map sums to f(x) - f(baseline))"

    @dataclass
    class Params:
        #: constant reference value, in the model's (normalised) input space
        baseline: float = 0.0

    def cost(self) -> float:
        # one forward+backward over the image and its baseline (Captum concatenates them)
        return 2.0

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        from captum.attr import DeepLift as CaptumDeepLift

        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        check_deeplift_model(model, x[:1], ctx, self.name)
        base = self.params.baseline

        def one(sl: slice) -> Tensor:
            with _quiet_captum():
                attr = CaptumDeepLift(model).attribute(
                    x[sl].clone(), baselines=base, target=target[sl].to(x.device)
                )
            return attr.detach().to(dtype).sum(dim=1)

        return run_in_image_chunks(one, x.shape[0], ctx, per_image=2)


@register
class DeepLiftShap(_DeepLiftChecks, Method):
    """DeepLIFT averaged over background images (Captum's DeepLiftShap), summed over channels."""

    name = "deeplift_shap"
    family = "gradient"
    signed = True
    needs_references = True
    channel_rule = "sum over channels (the map sums to f(x) - mean over backgrounds of f(b))"

    @dataclass
    class Params:
        #: backgrounds per image, drawn without replacement from the reference images
        #: (``ctx.references``; all of them when equal to their number; "references" before
        #: 2026-11-30)
        backgrounds: int = 10

        RENAMED: ClassVar[dict] = {"references": ("backgrounds", None)}

        def validate(self) -> None:
            if self.backgrounds < 2:
                raise ValueError("backgrounds must be >= 2 (Captum's DeepLiftShap needs a distribution)")

    def cost(self) -> float:
        # one forward+backward over the image and each background: 2 x backgrounds samples
        return 2.0 * self.params.backgrounds

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        from captum.attr import DeepLiftShap as CaptumDeepLiftShap

        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        pool = _references(ctx, x, self.name)
        k = self.params.backgrounds
        if k > pool.shape[0]:
            raise ValueError(f"{self.name}: backgrounds={k} exceeds the {pool.shape[0]} reference images given "
                             "(run.references in a job)")
        check_deeplift_model(model, x[:1], ctx, self.name)
        gens = per_image_generators(ctx.seed, self.name, ctx.indices_for(x.shape[0]))
        picks = [torch.randperm(pool.shape[0], generator=g)[:k].sort().values for g in gens]

        def one(i: int) -> Tensor:
            with _quiet_captum():
                attr = CaptumDeepLiftShap(model).attribute(
                    x[i : i + 1].clone(), baselines=pool[picks[i].to(x.device)], target=int(target[i])
                )
            return attr.detach().to(dtype)[0].sum(dim=0)

        # One pass per image holds it and its backgrounds whatever the budget is: on an
        # out-of-memory error, halving the budget (each_image) would only redo the same pass.
        return torch.stack([one(i) for i in range(x.shape[0])])


@register
class GradientShap(Method):
    """Gradient SHAP (Captum's GradientShap): expected gradient x (input - background), summed over channels."""

    name = "gradient_shap"
    family = "gradient"
    signed = True
    needs_references = True
    channel_rule = "sum over channels (in expectation the map sums to f(x) - mean over backgrounds of f(b))"

    @dataclass
    class Params(NoisySampleParams):
        """``samples``: random (background, path point, noise) draws per image (Captum's
        n_samples); ``noise_level``: the noise std as a fraction of the image's value range, as
        SmoothGrad's (Captum's stdevs = noise_level x range), none by default."""

        noise_level: float = 0.0

    def cost(self) -> float:
        return float(self.params.samples)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        from captum._utils.gradient import compute_gradients
        from captum.attr import GradientShap as CaptumGradientShap

        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        pool = _references(ctx, x, self.name)
        p = self.params
        forward = forward_scores(model, ctx, dtype, grad=True)
        flat = x.reshape(x.shape[0], -1)
        stdevs = (p.noise_level * (flat.amax(dim=1) - flat.amin(dim=1))).tolist()
        indices = ctx.indices_for(x.shape[0]).tolist()

        def chunked_gradients(forward_fn, inputs, target_ind=None, additional_forward_args=None):
            # Captum's gradient step over (samples x image) points, split into max_batch chunks
            (points,) = inputs
            tgt = torch.as_tensor(target_ind, device=points.device) if isinstance(target_ind, list) else target_ind

            def one(sl: slice) -> Tensor:
                part = points[sl].detach().requires_grad_(True)
                t = tgt[sl] if isinstance(tgt, Tensor) and tgt.dim() > 0 else tgt
                return compute_gradients(forward_fn, (part,), t, additional_forward_args)[0]

            return (run_in_chunks(one, points.shape[0], ctx),)

        def one(i: int) -> Tensor:
            explainer = CaptumGradientShap(forward)
            explainer.gradient_func = chunked_gradients
            with seeded_global_rng(image_seed(ctx.seed, self.name, indices[i]), x.device):
                attr = explainer.attribute(
                    x[i : i + 1].clone(), baselines=pool, n_samples=p.samples, stdevs=float(stdevs[i]),
                    target=int(target[i]),
                )
            return attr.detach().to(dtype)[0].sum(dim=0)

        return each_image(one, x.shape[0], ctx)


# --------------------------------------------------------------------------------------------
# Perturbation families over superpixels
# --------------------------------------------------------------------------------------------


class _SuperpixelMethod(Method):
    """Base of the perturbation bridges: superpixel mask, constant baseline, output choice."""

    family = "prediction"
    signed = True
    cost_unit = "forward"
    channel_rule = (
        "none needed: all channels of a superpixel are perturbed together, so Captum's per-channel "
        "maps are equal; channel 0 is the map"
    )

    def mask(self, x: Tensor) -> Tensor:
        """Captum's feature_mask for x: (1, 1, H, W), broadcast over images and channels."""
        return patch_mask(x.shape[-2], x.shape[-1], self.params.patch, x.device).view(1, 1, *x.shape[-2:])

    def features(self, height: int, width: int) -> int:
        return patch_count(height, width, self.params.patch)


def _check_patch(p: Any) -> None:
    if p.patch < 1:
        raise ValueError("patch must be >= 1")


@register
class FeatureAblation(_SuperpixelMethod):
    """Drop of the target score when a superpixel is set to the baseline (Captum's FeatureAblation)."""

    name = "feature_ablation"

    @dataclass
    class Params:
        #: side of the square superpixels, px (the last row/column cropped at the border)
        patch: int = 8
        #: value an ablated superpixel takes, in the model's (normalised) input space
        baseline: float = 0.0
        output: Output = "logit"

        def validate(self) -> None:
            _check_patch(self)

    def cost(self, height: int = 224, width: int = 224) -> float:
        return float(self.features(height, width) + 1)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        from captum.attr import FeatureAblation as CaptumFeatureAblation

        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        p = self.params
        explainer = CaptumFeatureAblation(forward_scores(model, ctx, dtype, p.output))
        mask = self.mask(x)

        def one(sl: slice) -> Tensor:
            images = sl.stop - sl.start
            attr = explainer.attribute(
                x[sl], baselines=p.baseline, target=target[sl].to(x.device), feature_mask=mask,
                perturbations_per_eval=max(1, ctx.max_batch // images),
            )
            return attr.detach().to(dtype)[:, 0]

        return run_in_chunks(one, x.shape[0], ctx)


@dataclass
class _SampledParams:
    """The parameters the sampled superpixel bridges share."""

    #: Captum's n_samples per image: coalitions (Kernel SHAP; the first two are all and none),
    #: random superpixel subsets (LIME), feature permutations (Shapley value sampling)
    samples: int = 1000
    #: side of the square superpixels, px (the last row/column cropped at the border)
    patch: int = 8
    #: value an absent superpixel takes, in the model's (normalised) input space
    baseline: float = 0.0
    output: Output = "logit"

    def validate(self) -> None:
        _check_patch(self)
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


class _SampledSuperpixelMethod(_SuperpixelMethod):
    """Per-image Captum calls under the image's seeded global generators."""

    Params = _SampledParams

    def cost(self) -> float:
        return float(self.params.samples)

    def explainer(self, forward: Callable[[Tensor], Tensor]) -> Any:
        raise NotImplementedError

    def extra(self, x: Tensor) -> dict[str, Any]:
        return {}

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        dtype = working_dtype(x)
        x = x.detach().to(dtype)
        p = self.params
        forward = forward_scores(model, ctx, dtype, p.output)
        mask = self.mask(x)
        indices = ctx.indices_for(x.shape[0]).tolist()
        extra = self.extra(x)

        def one(i: int) -> Tensor:
            with seeded_global_rng(image_seed(ctx.seed, self.name, indices[i]), x.device):
                attr = self.explainer(forward).attribute(
                    x[i : i + 1], baselines=p.baseline, target=int(target[i]), feature_mask=mask,
                    n_samples=p.samples, perturbations_per_eval=max(1, min(p.samples, ctx.max_batch)), **extra,
                )
            return attr.detach().to(dtype)[0, 0]

        return each_image(one, x.shape[0], ctx)


@register
class KernelShap(_SampledSuperpixelMethod):
    """Kernel SHAP over superpixels (Captum's KernelShap): a Shapley-kernel weighted linear fit."""

    name = "kernel_shap"

    def explainer(self, forward):
        from captum.attr import KernelShap as CaptumKernelShap

        return CaptumKernelShap(forward)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        if self.features(x.shape[-2], x.shape[-1]) < 2:
            raise ValueError(f"{self.name}: patch {self.params.patch} leaves fewer than 2 superpixels")
        return super().attribute(model, x, target, ctx)


@register
class Lime(_SampledSuperpixelMethod):
    """LIME over superpixels (Captum's Lime): a weighted linear fit to random superpixel subsets."""

    name = "lime"

    @dataclass
    class Params(_SampledParams):
        #: the interpretable model: "ridge" (the lime package's default) or "lasso" (Captum's
        #: default, with alpha = 0.01), through Captum's SkLearnRidge / SkLearnLasso
        surrogate: Literal["ridge", "lasso"] = "ridge"
        #: its regularisation weight (sklearn's alpha; named ``alpha`` before 2026-11-30, which
        #: said something else in LRP's alpha-beta rule)
        regularisation: float = 1.0
        #: width of the exponential kernel on the cosine distance to the image (Captum's default)
        kernel_width: float = 1.0

        RENAMED: ClassVar[dict] = {"alpha": ("regularisation", None)}

        def validate(self) -> None:
            super().validate()
            if self.regularisation <= 0 or self.kernel_width <= 0:
                raise ValueError("regularisation and kernel_width must be > 0")

    def explainer(self, forward):
        from captum._utils.models.linear_model import SkLearnLasso, SkLearnRidge
        from captum.attr import Lime as CaptumLime
        from captum.attr._core.lime import get_exp_kernel_similarity_function

        surrogate = {"ridge": SkLearnRidge, "lasso": SkLearnLasso}[self.params.surrogate]
        return CaptumLime(
            forward, interpretable_model=surrogate(alpha=self.params.regularisation),
            similarity_func=get_exp_kernel_similarity_function("cosine", self.params.kernel_width),
        )


@register
class ShapleyValueSampling(_SampledSuperpixelMethod):
    """Shapley values of superpixels by permutation sampling (Captum's ShapleyValueSampling)."""

    name = "shapley_value_sampling"

    @dataclass
    class Params(_SampledParams):
        samples: int = 25  # permutations: each costs one forward per superpixel

    def cost(self, height: int = 224, width: int = 224) -> float:
        return float(self.params.samples * self.features(height, width) + 1)

    def explainer(self, forward):
        from captum.attr import ShapleyValueSampling as CaptumShapleyValueSampling

        return CaptumShapleyValueSampling(forward)
