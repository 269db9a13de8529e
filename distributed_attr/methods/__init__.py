"""The attribution method registry and the calls that use it.

Importing this package registers every method: the built-in ones (every module of this package is
imported, so a new method is one new file) and those other installed packages declare under the
entry-point group ``distributed_attr.methods`` (docs/contributing.md). ``compute_maps`` is what the runner
calls: it groups the requested methods by ``share_group`` so that methods which can share passes
do, and returns one (N, H, W) float32 map per method.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..commons import resolve_target
from ..registry import import_modules
from .base import (
    METHODS,
    Context,
    Method,
    build_method,
    resolve_layer,
)

import_modules(__name__, __path__)

__all__ = ["METHODS", "Context", "Method", "attribute", "build_method", "compute_maps", "list_methods"]


def compute_maps(
    model: nn.Module, x: Tensor, target: Tensor, methods: Sequence[Method], ctx: Context
) -> dict[str, Tensor]:
    """Every method's maps for one batch, sharing passes inside each ``share_group``."""
    groups: dict[Any, list[Method]] = defaultdict(list)
    for m in methods:
        groups[m.share_group or ("solo", m.name)].append(m)
    out: dict[str, Tensor] = {}
    for members in groups.values():
        cls = type(members[0])
        if len(members) == 1:
            out[members[0].name] = members[0].attribute(model, x, target, ctx)
        else:
            out.update(cls.attribute_group(members, model, x, target, ctx))
    return {m.name: out[m.name].float() for m in methods}


def attribute(
    model: nn.Module,
    images: Tensor,
    method: str,
    target: Tensor | Sequence[int] | int | None = None,
    *,
    seed: int = 0,
    indices: Tensor | None = None,
    layer: str | nn.Module | None = None,
    max_batch: int = 256,
    autocast: torch.dtype | None = None,
    references: Tensor | None = None,
    **params: Any,
) -> Tensor:
    """Attribution maps (N, H, W) for a batch of preprocessed images (N, C, H, W).

    ``target`` is a class index per image (or one for all); the model's prediction when omitted.
    ``params`` are the method's parameters (see ``list_methods()``); unknown ones raise with the list
    of valid ones. The result lives on the images' device.
    """
    m = build_method(method, params)
    target_t = resolve_target(model, images, target, max_batch)
    layer_mod: nn.Module | None
    if isinstance(layer, nn.Module):
        layer_mod = layer
    elif m.needs_layer:
        layer_mod = resolve_layer(model, layer, images)
    else:
        layer_mod = None
    ctx = Context(
        seed=seed,
        indices=indices,
        layer=layer_mod,
        budget=max_batch,
        autocast=autocast,
        references=references,
    )
    return compute_maps(model, images, target_t, [m], ctx)[method]


def list_methods() -> dict[str, dict[str, Any]]:
    """Every registered method with its family, parameters and defaults."""
    return {name: METHODS.get(name).describe() for name in METHODS}


# Last, once every name of this module exists: a plugin may import any of them.
METHODS.load_plugins()
