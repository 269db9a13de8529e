"""The contract every evaluation metric follows, and the tensor helpers they share.

A metric is a pure, batched tensor function ``(model, x (N,C,H,W), maps (N,H,W), target (N,), ctx)
-> {output: (N, *trailing)}``. It never touches files. Outputs are named and shaped up front
(``outputs``), so the store writer can pre-allocate ``metrics/<metric>/<output>/<method>`` with
dims ``(image, cutoff, *trailing)`` before any image is evaluated.

Perturbed inputs are generated chunk by chunk inside ``run_in_chunks``: a deletion curve over 256
ImageNet images with 10 steps would otherwise hold 2,816 full-size images at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..commons import BatchContext, autocast_ctx, run_in_chunks, select_scores
from ..registry import Configurable, Registry

METRICS: Registry["Metric"] = Registry("metric", group="distributed_attr.metrics")

#: the perturbation baselines every perturbation metric understands, besides a constant number
BASELINES = ("zero", "blur", "mean")
#: the class score a metric reads, in the methods' words: the softmax "probability" or the raw "logit"
OUTPUTS = ("probability", "logit")
#: ``Params.RENAMED`` of the metrics that called ``output`` "activation" (softmax|logit) before
#: 2026-11-30: old configs and the configs stored in old stores still read
OUTPUT_RENAMED = {"activation": ("output", {"softmax": "probability", "logit": "logit"})}


def register(cls: type["Metric"]) -> type["Metric"]:
    """Class decorator adding a metric to the registry."""
    return METRICS.register(cls)


@dataclass(frozen=True)
class MetricContext(BatchContext):
    """What a metric may use besides the model, the images, the maps and the targets: the batch's
    seed, indices, budget and autocast (``BatchContext``), plus what metrics alone need."""

    #: other models trained on the same data (name -> model), for feature detection
    evaluators: dict[str, nn.Module] = field(default_factory=dict)
    #: the evaluators' names when no models are at hand (the driver lays out the store from names
    #: alone: ``outputs`` and ``coords`` read only names); None: the keys of ``evaluators``
    evaluator_names: tuple[str, ...] | None = None
    #: per-channel mean of the dataset (C,), in the model's input space, for the "mean" baseline
    dataset_mean: Tensor | None = None
    #: the batch's ground-truth masks (N, H, W), bool, when the data has them
    masks: Tensor | None = None
    #: (x, target[, indices]) -> maps (N, H, W) of the method being evaluated; set by the pipeline
    #: per method. Call it through ``explain_rows``, which passes the rows' image indices to an
    #: explain that takes them
    explain: Callable[..., Tensor] | None = None
    #: whether ``explain`` takes an ``indices`` keyword (read from its signature once, here)
    explain_takes_indices: bool = field(init=False, default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "explain_takes_indices", _takes_indices(self.explain))


def _takes_indices(fn: Callable[..., Tensor] | None) -> bool:
    import inspect

    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no keyword we can know of
        return False
    return "indices" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def explain_rows(ctx: MetricContext, x: Tensor, target: Tensor, indices: Tensor) -> Tensor:
    """``ctx.explain`` on the rows ``x``, whose images have the global indices ``indices`` (N,).

    A sampling method (SmoothGrad, RISE, ...) draws its random numbers per image index; without
    the indices a recomputed map would draw those of the row's position in the chunk, and a
    robustness score would change with the batch the image landed in. The pipeline's explain
    takes an ``indices`` keyword; a user's ``(x, target)`` callable is called as it is."""
    assert ctx.explain is not None
    if ctx.explain_takes_indices:
        return ctx.explain(x, target, indices=indices)
    return ctx.explain(x, target)


OutputSpec = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


class Metric(Configurable):
    """Base class. Subclasses set the class attributes and implement ``evaluate``.

    Class attributes
    ----------------
    name: registry key.
    higher_is_better: direction of ``score_output``.
    score_output: the scalar output (no trailing dims) rankings use.
    needs_model: False for metrics that look at the map only (sparseness, complexity).
    needs_masks: True for metrics that compare the map with ``ctx.masks`` (localisation); they
        raise, naming the metric, when the data has no mask column.
    needs_explain: True for metrics that recompute the map on other inputs with ``ctx.explain``
        (robustness); they raise, naming the metric, when it is not set.
    """

    section: ClassVar[str] = "metrics"
    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    score_output: ClassVar[str]
    needs_model: ClassVar[bool] = True
    needs_masks: ClassVar[bool] = False
    needs_explain: ClassVar[bool] = False

    def outputs(self, ctx: MetricContext) -> OutputSpec:
        """Trailing dimension names and sizes of every output beyond the image axis."""
        return {self.score_output: ((), ())}

    def coords(self, ctx: MetricContext) -> dict[str, list]:
        """Coordinate values of the trailing dimensions that have them (evaluator names, ...)."""
        return {}

    def evaluate(
        self, model: nn.Module, x: Tensor, maps: Tensor, target: Tensor, ctx: MetricContext
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def check_model(self, model: nn.Module, example: Tensor) -> None:
        """Check, before any work starts, that the parameters that name parts of ``model`` (layers
        to re-initialise, ...) fit it; ``example``: one preprocessed image (1, C, H, W). Raises
        ``ModelCheckError`` naming the parameter. Called on the driver's probe model before the
        store exists (as ``Method.check_model``). Default: nothing to check."""
        return None

    def cost(self) -> float:
        """Forward passes per image (for budgets and docs)."""
        return 0.0

    DESCRIBED: ClassVar[tuple[str, ...]] = ("higher_is_better", "score_output", "needs_model", "needs_masks",
                                            "needs_explain")


def build_metric(name: str, params: dict[str, Any] | None = None) -> Metric:
    return METRICS.get(name)(**(params or {}))


# --------------------------------------------------------------------------------------------
# Parameter checks shared by several metrics
# --------------------------------------------------------------------------------------------


def check_baseline(baseline: str | float) -> None:
    if isinstance(baseline, str) and baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r} is not one of {list(BASELINES)} or a number")


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r} is not one of {list(OUTPUTS)}")


# --------------------------------------------------------------------------------------------
# Model outputs for generated inputs
# --------------------------------------------------------------------------------------------


def class_scores(model: nn.Module, x: Tensor, target: Tensor, ctx: Any, output: str) -> Tensor:
    """``f(x)[target]`` as softmax probability or raw logit, for one chunk, without gradients."""
    with torch.no_grad(), autocast_ctx(ctx, x.device):
        out = model(x).float()
    if output == "probability":
        out = torch.softmax(out, dim=1)
    return select_scores(out, target)


def generated_scores(
    model: nn.Module,
    total: int,
    make: Callable[[Tensor], tuple[Tensor, Tensor]],
    ctx: Any,
    output: str,
    device: torch.device,
) -> Tensor:
    """Class scores of ``total`` generated samples. ``make(flat_index)`` builds the inputs and
    targets of one chunk of sample indices; chunks hold at most ``ctx.max_batch`` samples."""

    def one(sl: slice) -> Tensor:
        idx = torch.arange(sl.start, sl.stop, device=device)
        xb, tb = make(idx)
        return class_scores(model, xb, tb, ctx, output)

    return run_in_chunks(one, total, ctx)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def gaussian_kernel1d(size: int, sigma: float, device=None, dtype=torch.float32) -> Tensor:
    """A normalised 1-D Gaussian of ``size`` taps."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    k = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (k / k.sum()).to(device=device, dtype=dtype)


def gaussian_blur(x: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of every channel of (N, C, H, W), reflect padding (replicate when
    the image is too small to reflect), so borders are not darkened by zero padding."""
    n, c, h, w = x.shape
    k = gaussian_kernel1d(size, sigma, device=x.device, dtype=torch.float32)
    pad = size // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    xf = F.pad(x.float(), (pad, pad, pad, pad), mode=mode)
    xf = F.conv2d(xf, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    xf = F.conv2d(xf, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    return xf.to(x.dtype)


def baseline_images(
    x: Tensor, baseline: str | float, ctx: MetricContext, blur_size: int = 11, blur_sigma: float = 5.0
) -> Tensor:
    """The image every perturbed pixel is taken from, (N, C, H, W).

    "zero": 0 (Xplique's default, and the black image of normalised-to-[0,1] data);
    "blur": the image blurred by a Gaussian (Petsiuk et al.'s insertion start);
    "mean": the dataset's per-channel mean when ``ctx.dataset_mean`` is set, else each image's own
    per-channel mean (Quantus's "mean"); a number: that constant.
    """
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros_like(x)
        if baseline == "blur":
            return gaussian_blur(x, blur_size, blur_sigma)
        if baseline == "mean":
            if ctx.dataset_mean is not None:
                mean = torch.as_tensor(ctx.dataset_mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
                if mean.shape[1] != x.shape[1]:
                    raise ValueError(
                        f"dataset_mean has {mean.shape[1]} channels, the images have {x.shape[1]}"
                    )
                return mean.expand_as(x).clone()
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
        check_baseline(baseline)
    return torch.full_like(x, float(baseline))


# --------------------------------------------------------------------------------------------
# Feature orders and cells
# --------------------------------------------------------------------------------------------


def cell_of_pixel(h: int, w: int, rows: int, cols: int, mode: str, device=None) -> Tensor:
    """Cell index (0..rows*cols-1) of every pixel, row-major, (H*W,).

    mode "patch": square patches of ``H/rows`` pixels, the last row/column possibly partial;
    mode "grid": ``rows x cols`` cells of (nearly) equal size, pixel r in cell floor(r*rows/H), as a
    nearest-neighbour upsampling of a rows x cols mask does (Xplique's MuFidelity grid).
    """
    r = torch.arange(h, device=device)
    c = torch.arange(w, device=device)
    if mode == "patch":
        ph, pw = -(-h // rows), -(-w // cols)
        rr, cc = r // ph, c // pw
    else:
        rr, cc = (r * rows) // h, (c * cols) // w
    return (rr.view(-1, 1) * cols + cc.view(1, -1)).reshape(-1)


def cell_means(values: Tensor, cell: Tensor, n_cells: int) -> Tensor:
    """Mean of (N, H*W) ``values`` over each cell, (N, n_cells)."""
    n = values.shape[0]
    idx = cell.view(1, -1).expand(n, -1)
    sums = torch.zeros(n, n_cells, dtype=values.dtype, device=values.device).scatter_add_(1, idx, values)
    counts = torch.bincount(cell, minlength=n_cells).to(values.dtype)
    return sums / counts.clamp_min(1)


def cell_sums(values: Tensor, cell: Tensor, n_cells: int) -> Tensor:
    """Sum of (N, H*W) ``values`` over each cell, (N, n_cells)."""
    n = values.shape[0]
    idx = cell.view(1, -1).expand(n, -1)
    return torch.zeros(n, n_cells, dtype=values.dtype, device=values.device).scatter_add_(1, idx, values)


def descending_ranks(values: Tensor) -> Tensor:
    """Position of every feature when (N, F) ``values`` are sorted in descending order (0 = the
    most important). Ties keep index order (a stable sort), so the order is reproducible; NaN
    ranks last."""
    v = torch.where(torch.isnan(values), torch.full_like(values, float("-inf")), values)
    order = torch.argsort(-v, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(v.shape[1], device=v.device).expand_as(order))
    return ranks


def pixel_ranks(maps: Tensor, patch: int, order: str) -> tuple[Tensor, int]:
    """Rank of every pixel's feature (N, H*W) and the number of features.

    A feature is a pixel (``patch`` 1) or a ``patch`` x ``patch`` square ranked by the mean of the
    map over it. ``order`` "signed" ranks by the signed value (Xplique, Quantus), "absolute" by
    the magnitude."""
    n, h, w = maps.shape
    values = maps.float().reshape(n, h * w)
    if order == "absolute":
        values = values.abs()
    if patch <= 1:
        return descending_ranks(values), h * w
    rows, cols = -(-h // patch), -(-w // patch)
    cell = cell_of_pixel(h, w, rows, cols, "patch", device=maps.device)
    ranks = descending_ranks(cell_means(values, cell, rows * cols))
    return ranks.gather(1, cell.view(1, -1).expand(n, -1)), rows * cols


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def average_ranks(values: Tensor) -> Tensor:
    """Ranks along the last dim (1-based), ties sharing their average rank (as scipy's rankdata)."""
    shape = values.shape
    v = values.reshape(-1, shape[-1]).double()
    m, k = v.shape
    sorted_v, order = torch.sort(v, dim=1, stable=True)
    new_group = torch.ones_like(sorted_v, dtype=torch.bool)
    new_group[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # group id within the row
    group = group + torch.arange(m, device=v.device).view(-1, 1) * k  # unique across rows
    positions = torch.arange(1, k + 1, device=v.device, dtype=torch.float64).expand(m, k)
    flat_group = group.reshape(-1)
    sums = torch.zeros(m * k, dtype=torch.float64, device=v.device).index_add_(0, flat_group, positions.reshape(-1))
    counts = torch.zeros(m * k, dtype=torch.float64, device=v.device).index_add_(
        0, flat_group, torch.ones(m * k, dtype=torch.float64, device=v.device)
    )
    mean_rank_sorted = (sums / counts.clamp_min(1))[flat_group].view(m, k)
    ranks = torch.empty_like(mean_rank_sorted).scatter_(1, order, mean_rank_sorted)
    return ranks.view(shape)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dim, in float64; NaN where either side is constant."""
    a = a.double() - a.double().mean(dim=-1, keepdim=True)
    b = b.double() - b.double().mean(dim=-1, keepdim=True)
    den = torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    num = (a * b).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation along the last dim (Pearson of average ranks, as scipy)."""
    return pearson(average_ranks(a), average_ranks(b))


def trapezoid_auc(curve: Tensor) -> Tensor:
    """Area under (N, S+1) equally spaced points on [0, 1] by the trapezoid rule."""
    steps = curve.shape[-1] - 1
    if steps < 1:
        return curve[..., 0]
    return (curve[..., :-1] + curve[..., 1:]).sum(dim=-1) / (2.0 * steps)
