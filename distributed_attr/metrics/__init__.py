"""The evaluation metric registry and the call that uses it.

Importing this package registers every metric: the built-in ones (every module of this package is
imported, so a new metric is one new file) and those other installed packages declare under the
entry-point group ``distributed_attr.metrics``. Workers build a metric with
``build_metric(name, params)`` and call ``metric.evaluate(model, x, maps, target, ctx)`` once for
the raw maps and once per filter cutoff; ``evaluate`` below is the one-call form for users.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..registry import import_modules
from .base import METRICS, Metric, MetricContext, build_metric, register
from .randomisation import randomisation_check

import_modules(__name__, __path__)

__all__ = [
    "METRICS",
    "Metric",
    "MetricContext",
    "build_metric",
    "evaluate",
    "list_metrics",
    "randomisation_check",
    "register",
]


def evaluate(
    model: nn.Module | None,
    images: Tensor,
    maps: Tensor,
    metric: str,
    target: Tensor | Sequence[int] | int | None = None,
    *,
    seed: int = 0,
    indices: Tensor | None = None,
    evaluators: dict[str, nn.Module] | None = None,
    max_batch: int = 256,
    autocast: torch.dtype | None = None,
    dataset_mean: Tensor | None = None,
    masks: Tensor | None = None,
    explain: Callable[[Tensor, Tensor], Tensor] | None = None,
    **params: Any,
) -> dict[str, Tensor]:
    """Evaluate attribution ``maps`` (N, H, W) of ``images`` (N, C, H, W) with ``metric``.

    Returns ``{output: (N, *trailing)}`` on the images' device (see ``list_metrics()`` for every
    metric's outputs and parameters). ``target`` is the explained class per image (or one for
    all); the model's prediction when omitted. ``params`` are the metric's parameters; unknown
    ones raise with the list of valid ones. ``evaluators`` are other models trained on the same
    data (feature detection); ``dataset_mean`` (C,) serves the "mean" baseline. ``masks``
    (N, H, W) bool: the ground truth localisation metrics compare with; ``explain``:
    ``(x, target) -> maps`` recomputing the evaluated method's maps, for robustness metrics.
    """
    from ..commons import resolve_target

    m = build_metric(metric, params)
    if maps.dim() != 3 or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise ValueError(
            f"maps must have shape (N, H, W) = {(images.shape[0], *images.shape[2:])}, got {tuple(maps.shape)}"
        )
    if m.needs_model and model is None:
        raise ValueError(f"metric {metric!r} needs the model")
    ctx = MetricContext(
        seed=seed,
        indices=indices,
        budget=max_batch,
        autocast=autocast,
        evaluators=dict(evaluators or {}),
        dataset_mean=dataset_mean,
        masks=None if masks is None else masks.to(images.device).bool(),
        explain=explain,
    )
    if m.needs_model:
        target_t = resolve_target(model, images, target, max_batch)
    else:
        target_t = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
    maps = maps.to(images.device)
    out = m.evaluate(model, images, maps, target_t, ctx)
    return {k: v.to(images.device) for k, v in out.items()}


def list_metrics() -> dict[str, dict[str, Any]]:
    """Every registered metric with its direction, score output, parameters and defaults."""
    return {name: METRICS.get(name).describe() for name in METRICS}


# Last, once every name of this module exists: a plugin may import any of them.
METRICS.load_plugins()
