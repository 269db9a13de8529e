"""The choices a job's methods make for the user, found once before any work (on the driver's
probe model) so that they can be printed and recorded: the CAM layer of every layer method when
its ``layer`` is not set (``base.resolve_layer``) and the grid of feature maps it leaves, the
canonizer LRP puts on the model when ``canonizer`` is "auto", the leading tokens and patch grid of
the attention methods when ``prefix_tokens`` is not set.

Every entry comes from the methods' own code (``Method.resolved_choices``), with the batch
context's CAM layer resolved exactly as the workers resolve it (``context_layer``), so what is
recorded is what the maps are computed with.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from .base import Context, Method, grid_layout, resolve_layer, trace_modules

#: a CAM grid with fewer positions than this along either side makes maps that are nearly flat
#: (a few bilinear ramps): ``coarse_grid_warnings`` says so
MIN_GRID = 4


def context_layer_owner(methods: Sequence[Method]) -> Method | None:
    """The method whose ``layer`` parameter names the batch context's CAM layer (the first one
    that sets it), or None when that layer is found automatically."""
    return next((m for m in methods if getattr(m.params, "layer", None)), None)


def context_layer(model: nn.Module, methods: Sequence[Method], example: Tensor) -> nn.Module | None:
    """The batch context's CAM layer (``Context.layer``) for ``methods``: the layer the first
    method that names one names, else ``resolve_layer``'s automatic choice on ``example`` (one
    image); None when no method needs a layer. A CAM method whose own ``layer`` is set hooks that
    one instead (``GradientGroupMethod.layer_module``)."""
    if not any(m.needs_layer for m in methods):
        return None
    owner = context_layer_owner(methods)
    return resolve_layer(model, owner.params.layer if owner is not None else None, example[:1])


def _parameter_set(method: Method, name: str, unset: Any) -> bool:
    return hasattr(method.params, name) and getattr(method.params, name) != unset


def resolve_choices(model: nn.Module, methods: Sequence[Method], example: Tensor) -> dict[str, dict[str, Any]]:
    """{method: its choices} for the methods that make any (``Method.resolved_choices``), each
    with ``chosen``: "automatically", or the config key that decided it
    (``methods.gradcam.layer``; a CAM method without its own ``layer`` takes the first one set
    among the job's methods). Plain JSON values (lists, not tuples), so that a stored copy
    compares equal. ``example``: one image (1, C, H, W) of the job's size and channels."""
    layer = context_layer(model, methods, example)
    owner = context_layer_owner(methods)
    ctx = Context(layer=layer)
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        found = m.resolved_choices(model, example[:1], ctx)
        if not found:
            continue
        if "layer" in found:
            if _parameter_set(m, "layer", None):
                chosen = f"methods.{m.name}.layer"
            elif owner is not None:
                chosen = f"methods.{owner.name}.layer"
            else:
                chosen = "automatically"
        elif "canonizer" in found:
            chosen = f"methods.{m.name}.canonizer" if _parameter_set(m, "canonizer", "auto") else "automatically"
        elif "prefix_tokens" in found:
            chosen = f"methods.{m.name}.prefix_tokens" if _parameter_set(m, "prefix_tokens", None) else "automatically"
        else:
            chosen = "automatically"
        out[m.name] = {**found, "chosen": chosen}
    return out


def describe_choice(method: str, choice: dict[str, Any]) -> str:
    """One line for a method's choices: "gradcam: layer features (chosen automatically; 8x8
    grid)"."""
    chosen = choice.get("chosen", "automatically")
    how = "chosen automatically" if chosen == "automatically" else f"set by {chosen}"
    grid = choice.get("grid")
    grid_text = f"{grid[0]}x{grid[1]}" if grid else "?"
    if "layer" in choice:
        tokens = choice.get("layout") == "tokens"
        what = f"{grid_text} grid" + (f" of tokens after {_tokens(choice.get('prefix_tokens', 0))}" if tokens else "")
        return f"{method}: layer {choice['layer']} ({how}; {what})"
    if "canonizer" in choice:
        return f"{method}: canonizer {choice['canonizer']} ({how})"
    if "prefix_tokens" in choice:
        return (f"{method}: {grid_text} patch grid after {_tokens(choice['prefix_tokens'])} of "
                f"{choice.get('tokens')} ({how})")
    return f"{method}: {choice} ({how})"


def _tokens(n: int) -> str:
    return f"{n} leading token{'' if n == 1 else 's'}"


def spatial_layers(model: nn.Module, example: Tensor) -> list[tuple[str, tuple[int, int]]]:
    """(name, (h, w)) of every module whose output is a (N, C, h, w) map of more than one position,
    in the order the modules finish on one forward pass of ``example``: the candidates for a
    CAM layer."""
    size = tuple(example.shape[-2:])
    found: list[tuple[str, tuple[int, int]]] = []

    def after(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, Tensor) and output.dim() == 4:
                try:
                    kind = grid_layout(output.shape, "auto", size).kind
                except ValueError:
                    return
                if kind == "nchw" and output.shape[-1] * output.shape[-2] > 1:
                    found.append((name, (int(output.shape[-2]), int(output.shape[-1]))))

        return hook

    trace_modules(model, example, after)
    return found


def coarse_grid_warnings(model: nn.Module, example: Tensor, choices: dict[str, dict[str, Any]],
                         min_grid: int = MIN_GRID) -> list[dict[str, Any]]:
    """One warning (``{"kind": "coarse_grid", "method", "layer", "grid", "message"}``) for every
    CAM method whose layer leaves a grid smaller than ``min_grid`` x ``min_grid``: its maps are a
    few upsampled cells, nearly flat. The message names the deepest layer with a finer grid, when
    the model has one."""
    coarse = {m: c for m, c in choices.items()
              if "layer" in c and c.get("grid") and min(c["grid"]) < min_grid}
    if not coarse:
        return []
    finer = [(n, g) for n, g in spatial_layers(model, example) if min(g) >= min_grid]
    out = []
    for method, c in coarse.items():
        h, w = c["grid"]
        how = "chosen automatically" if c.get("chosen") == "automatically" else f"set by {c.get('chosen')}"
        hint = (f"; e.g. {finer[-1][0]!r} ({finer[-1][1][0]}x{finer[-1][1][1]})" if finer
                else "; this model has no layer with a finer grid")
        out.append({
            "kind": "coarse_grid", "method": method, "layer": c["layer"], "grid": [int(h), int(w)],
            "message": (f"{method}: layer {c['layer']} ({how}) leaves a {h}x{w} grid, smaller than "
                        f"{min_grid}x{min_grid}: its maps are a few upsampled cells, nearly flat. Set "
                        f"methods.{method}.layer to a layer with a finer grid{hint}"),
        })
    return out
