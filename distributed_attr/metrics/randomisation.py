"""Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading and top-down.

Layers are re-initialised one after the other from the output towards the input, each step
keeping the earlier randomisations (cascading), and the maps are recomputed after each step.
A method whose maps stay similar while the model is destroyed does not explain the model. The
similarity is the Spearman rank correlation of |map| (as Quantus's MPRT), per image.

Re-initialisation follows Quantus 0.6's MPRT so that numbers compare: every module that has a
``reset_parameters`` method, in ``named_modules`` order reversed, reset under
``torch.manual_seed(seed + 1)``; the global RNG state is restored afterwards.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import pearson, spearman


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own a ``reset_parameters`` method, in definition order."""
    return [name for name, m in model.named_modules() if name and hasattr(m, "reset_parameters")]


def _layer_name(model: nn.Module, layer: str | nn.Module | None) -> str | None:
    if layer is None or isinstance(layer, str):
        return layer
    for name, m in model.named_modules():
        if m is layer:
            return name
    raise ValueError("the CAM layer is not a submodule of the model")


def randomisation_check(
    model: nn.Module,
    images: Tensor,
    method: str,
    target: Tensor | Sequence[int] | int | None = None,
    layers_order: Sequence[str] | str | None = None,
    *,
    seed: int = 0,
    indices: Tensor | None = None,
    layer: str | nn.Module | None = None,
    max_batch: int = 256,
    similarity: str = "spearman",
    absolute: bool = True,
    **params: Any,
) -> dict[str, Tensor]:
    """``{layer name: similarity per image (N,)}`` after cascading re-initialisation.

    ``layers_order``: None or "top_down" (every randomisable layer, output first), "bottom_up",
    or an explicit sequence of module names randomised in that order. ``params`` go to the
    method; ``layer`` is the CAM layer (by name, or a module of ``model``). The model itself is
    never modified: a copy is randomised. The dict keeps the randomisation order.
    """
    from ..methods import attribute, resolve_target

    if similarity not in ("spearman", "pearson"):
        raise ValueError(f"similarity {similarity!r} is not one of ['spearman', 'pearson']")
    available = randomisable_layers(model)
    if layers_order is None or layers_order == "top_down":
        order = available[::-1]
    elif layers_order == "bottom_up":
        order = list(available)
    elif isinstance(layers_order, str):
        raise ValueError(f"layers_order {layers_order!r} is not 'top_down', 'bottom_up' or a list of layer names")
    else:
        order = list(layers_order)
        unknown = [name for name in order if name not in available]
        if unknown:
            raise ValueError(f"layers {unknown} cannot be re-initialised; randomisable layers: {available}")

    layer_name = _layer_name(model, layer)
    target_t = resolve_target(model, images, target, max_batch)
    common = dict(seed=seed, indices=indices, layer=layer_name, max_batch=max_batch, **params)
    original = attribute(model, images, method, target_t, **common)
    n = images.shape[0]
    ref = original.reshape(n, -1)
    if absolute:
        ref = ref.abs()
    corr = spearman if similarity == "spearman" else pearson

    randomised = copy.deepcopy(model)
    modules = dict(randomised.named_modules())
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    out: dict[str, Tensor] = {}
    for name in order:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed + 1)
            modules[name].reset_parameters()
        maps = attribute(randomised, images, method, target_t, **common).reshape(n, -1)
        if absolute:
            maps = maps.abs()
        out[name] = corr(ref, maps).float().to(images.device)
    return out
