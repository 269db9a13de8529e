"""Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading and top-down.

Layers are re-initialised one after the other from the output towards the input, each step
keeping the earlier randomisations (cascading), and the maps are recomputed after each step.
A method whose maps stay similar while the model is destroyed does not explain the model. The
similarity is the Spearman rank correlation of |map| (as Quantus's MPRT), per image.

Re-initialisation follows Quantus 0.6's MPRT so that numbers compare: every module that has a
``reset_parameters`` method, in ``named_modules`` order reversed, reset under
``torch.manual_seed(seed + 1)``; the global RNG state is restored afterwards.

Two entry points:

* ``randomisation_check(model, images, method, ...)``: from Python, every layer of the cascade,
  on a copy of the model, maps recomputed with ``distributed_attr.methods.attribute``.
* the ``model_randomisation`` metric (``metrics: {model_randomisation: {...}}`` in a job
  config): ``steps`` evenly spaced points of the cascade, the maps recomputed with
  ``ctx.explain``. ``ctx.explain`` closes over the job's own model and cannot take another one,
  so the metric re-initialises the layers of the model it is given *in place*, calls
  ``ctx.explain``, and puts every parameter and buffer back (the same tensor objects, the same
  bits) in a ``finally``, also when the method raises. ``ctx.explain`` must therefore compute
  its maps with the model passed to ``evaluate`` (the pipeline's does: it uses the worker's
  model, or its ``torch.compile`` wrapper, which shares the parameters).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..commons import ModelCheckError, run_in_chunks
from .base import Metric, MetricContext, explain_rows, pearson, register, spearman

SIMILARITIES = ("spearman", "pearson")
ORDERS = ("top_down", "bottom_up")


def randomisable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own a ``reset_parameters`` method, in definition order."""
    return [name for name, m in model.named_modules() if name and hasattr(m, "reset_parameters")]


def cascade_order(model: nn.Module, layers_order: Sequence[str] | str | None) -> list[str]:
    """The module names in the order they are re-initialised: None or "top_down" (every
    randomisable layer, output first), "bottom_up", or an explicit sequence of names."""
    available = randomisable_layers(model)
    if layers_order is None or layers_order == "top_down":
        return available[::-1]
    if layers_order == "bottom_up":
        return list(available)
    if isinstance(layers_order, str):
        raise ValueError(f"layers_order {layers_order!r} is not 'top_down', 'bottom_up' or a list of layer names")
    order = list(layers_order)
    unknown = [name for name in order if name not in available]
    if unknown:
        raise ValueError(f"layers {unknown} cannot be re-initialised; randomisable layers: {available}")
    return order


def cascade_points(n_layers: int, steps: int) -> list[int]:
    """How many layers of the cascade are re-initialised at each of ``steps`` evenly spaced points:
    ``ceil(k * n_layers / steps)`` for k = 1..steps, so the last point is the fully randomised
    model (repeated values when ``steps > n_layers``)."""
    return [-(-k * n_layers // steps) for k in range(1, steps + 1)]


def _reset_seeded(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` under ``torch.manual_seed(seed + 1)`` (Quantus's MPRT), the
    caller's CPU and CUDA RNG states restored afterwards."""
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        torch.manual_seed(seed + 1)
        module.reset_parameters()


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
    from ..commons import resolve_target
    from ..methods import attribute

    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity {similarity!r} is not one of {list(SIMILARITIES)}")
    order = cascade_order(model, layers_order)

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
    out: dict[str, Tensor] = {}
    for name in order:
        _reset_seeded(modules[name], seed)
        maps = attribute(randomised, images, method, target_t, **common).reshape(n, -1)
        if absolute:
            maps = maps.abs()
        out[name] = corr(ref, maps).float().to(images.device)
    return out


# --------------------------------------------------------------------------------------------
# The metric a job config enables
# --------------------------------------------------------------------------------------------


class ParameterSnapshot:
    """Every parameter and buffer of a model (and the parameters' gradients), to be put back bit
    for bit.

    ``restore`` re-attaches the original tensor objects and storages where something replaced
    them (a ``reset_parameters`` that assigns a new ``nn.Parameter``, or to ``.data``) and copies
    the saved values into them, so the model, and anything holding its tensors (a
    ``torch.compile`` wrapper, an optimiser), sees exactly what it saw before. Tied tensors are
    saved once."""

    def __init__(self, model: nn.Module):
        #: (the dict holding the tensor, its key, the tensor, its storage, its gradient)
        self._entries: list[tuple[dict, str, Tensor, Tensor, Tensor | None]] = []
        self._values: dict[int, Tensor] = {}
        self._grads: dict[int, Tensor] = {}
        with torch.no_grad():
            for module in model.modules():
                for store in (module._parameters, module._buffers):
                    for key, t in store.items():
                        if t is None:
                            continue
                        self._entries.append((store, key, t, t.data, t.grad))
                        if id(t) not in self._values:
                            self._values[id(t)] = t.detach().clone()
                            if t.grad is not None:
                                self._grads[id(t)] = t.grad.detach().clone()

    def restore(self) -> None:
        with torch.no_grad():
            for store, key, t, data, grad in self._entries:
                if store.get(key) is not t:
                    store[key] = t
                now = t.data
                if (now.data_ptr(), now.shape, now.dtype, now.device) != (data.data_ptr(), data.shape, data.dtype, data.device):
                    t.data = data
                t.grad = grad
            for _, _, t, _, grad in self._entries:
                t.copy_(self._values[id(t)])
                if grad is not None:
                    grad.copy_(self._grads[id(t)])


@register
class ModelRandomisation(Metric):
    """Similarity of the map to the maps of cascadingly re-initialised models (Adebayo et al. 2018; Quantus MPRT)."""

    name = "model_randomisation"
    higher_is_better = False
    score_output = "final_similarity"
    needs_model = True
    needs_explain = True

    @dataclass
    class Params:
        #: "top_down" (output layer first, Quantus's default), "bottom_up", or a list of module
        #: names re-initialised in that order
        #: (``Union``/``Optional`` spelt out: the registry's coercion does not see ``X | Y`` unions)
        layers: Union[str, tuple[str, ...]] = "top_down"  # noqa: UP007
        #: evenly spaced points of the cascade where the map is recomputed; the last is the fully
        #: randomised model
        steps: int = 4
        #: "spearman" (Quantus MPRT's default) or "pearson", of the flattened maps, per image
        similarity: str = "spearman"
        #: compare |map| (Quantus MPRT: abs=True)
        abs: bool = True
        #: the re-initialisation seed s (torch.manual_seed(s + 1) before every layer, as Quantus's
        #: ``seed``, whose default is 42); None: the job's run.seed (the context's seed)
        reinit_seed: Optional[int] = None  # noqa: UP045

        def validate(self) -> None:
            if self.steps < 1:
                raise ValueError("steps must be >= 1")
            if self.similarity not in SIMILARITIES:
                raise ValueError(f"similarity {self.similarity!r} is not one of {list(SIMILARITIES)}")
            if isinstance(self.layers, str):
                if self.layers not in ORDERS:
                    raise ValueError(f"layers {self.layers!r} is not one of {list(ORDERS)} or a list of module names")
            elif not self.layers:
                raise ValueError("layers must name at least one module")
            elif len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers {list(self.layers)} name a module twice")

    def outputs(self, ctx: MetricContext):
        return {"similarity": (("step",), (self.params.steps,)), "final_similarity": ((), ())}

    def coords(self, ctx: MetricContext) -> dict[str, list]:
        """Point k of ``steps`` re-initialises ``ceil(k L / steps)`` of the cascade's L layers."""
        return {"step": [k / self.params.steps for k in range(1, self.params.steps + 1)]}

    def cost(self) -> float:
        """Explanations per image (each costs what the method costs)."""
        return float(self.params.steps)

    def check_model(self, model: nn.Module, example: Tensor) -> None:
        """``layers`` names modules of the model that can be re-initialised (and some exist)."""
        try:
            self.schedule(model)
        except ValueError as exc:
            raise ModelCheckError(str(exc), "layers") from None

    def schedule(self, model: nn.Module) -> tuple[list[str], list[int]]:
        """The cascade's module names in randomisation order, and the number of them re-initialised
        at each of the ``steps`` points."""
        p = self.params
        try:
            order = cascade_order(model, p.layers)
        except ValueError as exc:
            raise ValueError(f"metric {self.name!r}: {exc}") from None
        if not order:
            raise ValueError(f"metric {self.name!r}: the model has no module with a reset_parameters method "
                             "to re-initialise")
        return order, cascade_points(len(order), p.steps)

    def evaluate(self, model, x, maps, target, ctx):
        if ctx.explain is None:
            raise ValueError(
                f"metric {self.name!r} needs the explanation function of the method it evaluates "
                "(ctx.explain is None): it recomputes the maps with the model's layers re-initialised"
            )
        if model is None:
            raise ValueError(f"metric {self.name!r} needs the model")
        p = self.params
        n = x.shape[0]
        if maps.shape != (n, *x.shape[2:]):
            raise ValueError(f"maps must have shape {(n, *x.shape[2:])}, got {tuple(maps.shape)}")
        order, points = self.schedule(model)
        if n == 0:
            empty = torch.empty(0, p.steps, device=x.device)
            return {"similarity": empty, "final_similarity": empty[:, 0]}
        seed = ctx.seed if p.reinit_seed is None else p.reinit_seed
        corr = spearman if p.similarity == "spearman" else pearson
        ref = maps.detach().to(x.device).double().reshape(n, -1)
        if p.abs:
            ref = ref.abs()
        target = target.to(x.device)
        modules = dict(model.named_modules())
        image_index = ctx.indices_for(n)

        def explain(sl: slice) -> Tensor:
            a = explain_rows(ctx, x[sl], target[sl], image_index[sl])
            if tuple(a.shape) != (sl.stop - sl.start, *x.shape[2:]):
                raise ValueError(
                    f"ctx.explain returned maps of shape {tuple(a.shape)} for {sl.stop - sl.start} inputs of "
                    f"shape {tuple(x.shape[1:])}; expected {(sl.stop - sl.start, *x.shape[2:])}"
                )
            return a.detach().to(x.device)

        sims: list[Tensor] = []
        done = 0
        last = torch.empty(0)
        snapshot = ParameterSnapshot(model)
        try:
            for count in points:
                if count > done:
                    for name in order[done:count]:
                        _reset_seeded(modules[name], seed)
                    done = count
                    a = run_in_chunks(explain, n, ctx).double().reshape(n, -1)
                    if p.abs:
                        a = a.abs()
                    last = corr(ref, a).float()
                sims.append(last)
        finally:
            snapshot.restore()
        similarity = torch.stack(sims, dim=1)
        return {"similarity": similarity, "final_similarity": similarity[:, -1].clone()}
