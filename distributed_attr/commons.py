"""What methods and metrics share: the per-batch context they read, per-image randomness, the
sample budget of one forward pass (with the out-of-memory fallback), autocast and model calls.

A context is immutable: a caller that needs other facts for a batch makes a new one with
``dataclasses.replace``. The one thing that must outlive a batch, the sample budget an
out-of-memory error lowered, lives in a ``SampleBudget`` the replaced contexts share.

Below both ``methods/`` and ``metrics/`` (which may import it; it imports neither), and like them
pure tensor code: no files, no Ray.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


class ModelCheckError(ValueError):
    """A parameter of a method or metric that names a part of the model (a layer, the module kinds a
    method rewrites) does not fit the model: raised by their ``check_model`` on the driver's probe,
    before the store exists. ``param`` is the parameter's name (None when no single parameter is
    at fault: the model itself cannot be explained this way), so the message can name the config
    key, e.g. ``methods.gradcam.layer``."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class SampleBudget:
    """The most samples one forward/backward pass may hold (steps x images, masks x images, ...):
    the configured size, lowered for good when a pass of that size runs out of device memory, so
    that later chunks, batches and units start at a size that fits instead of failing again."""

    def __init__(self, size: int = 256):
        self._size = max(1, int(size))

    @property
    def size(self) -> int:
        return self._size

    def lower_after_oom(self, failed: int) -> None:
        """A pass of ``failed`` samples ran out of memory: from now on at most half of it."""
        self._size = min(self._size, max(1, failed // 2))

    def reset(self, size: int) -> None:
        """Back to ``size`` (what it was before a batch that failed: the sizes that batch tried
        say nothing about the next one)."""
        self._size = max(1, int(size))

    def per(self, cost: int) -> "SampleBudget":
        """This budget counted in items that put ``cost`` samples each into a pass (an image with
        all its references, all its masks); lowering the view lowers this budget."""
        return _ScaledBudget(self, max(1, int(cost)))

    def __repr__(self) -> str:
        return f"SampleBudget({self.size})"


class _ScaledBudget(SampleBudget):
    def __init__(self, parent: SampleBudget, cost: int):
        self._parent, self._cost = parent, cost

    @property
    def size(self) -> int:
        return max(1, self._parent.size // self._cost)

    def lower_after_oom(self, failed: int) -> None:
        self._parent.lower_after_oom(2 * max(1, failed // 2) * self._cost)


@dataclass(frozen=True)
class BatchContext:
    """The batch-level facts every method and metric may use. Immutable; see the module note."""

    seed: int = 0
    #: global dataset index of every image of the batch (N,), int64, so that random draws are
    #: per image and do not depend on which other images share the batch; defaults to 0..N-1
    indices: Tensor | None = None
    #: the sample budget of one pass (``SampleBudget``; an int makes a fresh one of that size).
    #: Contexts made from this one by ``dataclasses.replace`` share it
    budget: SampleBudget | int = 256
    #: ``torch.bfloat16`` / ``torch.float16`` to run the model under autocast, or None
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.budget, SampleBudget):
            object.__setattr__(self, "budget", SampleBudget(self.budget))

    @property
    def max_batch(self) -> int:
        """Most samples one pass may hold now (the budget's current size)."""
        return self.budget.size  # type: ignore[union-attr]

    def indices_for(self, n: int) -> Tensor:
        if self.indices is None:
            return torch.arange(n, dtype=torch.int64)
        return self.indices.detach().to("cpu", torch.int64).reshape(-1)


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


def autocast_ctx(ctx: BatchContext, device: torch.device):
    """Autocast when asked for, a no-op otherwise."""
    if ctx.autocast is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=ctx.autocast)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def for_each_chunk(fn: Callable[[slice], None], n: int, ctx: BatchContext) -> None:
    """Call ``fn`` on consecutive slices of ``n`` samples, each of at most ``ctx.max_batch``, for
    what it accumulates (a sum of gradients over path points, of masks weighted by scores). On a
    CUDA out-of-memory error the slice is done again at half the size, and the lower size sticks
    in ``ctx.budget`` for the rest of the job; ``fn`` must change nothing before its pass fits."""
    start = 0
    while start < n:
        size = max(1, ctx.max_batch)
        sl = slice(start, min(n, start + size))
        try:
            fn(sl)
        except RuntimeError as exc:
            if not is_oom(exc) or size == 1:
                raise
            torch.cuda.empty_cache()
            ctx.budget.lower_after_oom(size)
            continue
        start = sl.stop


def run_in_chunks(fn: Callable[[slice], Tensor], n: int, ctx: BatchContext) -> Tensor:
    """``fn`` over ``n`` samples in slices of at most ``ctx.max_batch`` (``for_each_chunk``), its
    results concatenated."""
    outs: list[Tensor] = []
    for_each_chunk(lambda sl: outs.append(fn(sl)), n, ctx)
    return torch.cat(outs) if outs else torch.empty(0)


def select_scores(logits: Tensor, target: Tensor) -> Tensor:
    """``logits[i, target[i]]`` as a vector."""
    return logits.gather(1, target.view(-1, 1).to(logits.device)).squeeze(1)


def forward_probabilities(model: nn.Module, x: Tensor, ctx: BatchContext) -> Tensor:
    """Softmax over classes for a batch of any size without gradients, chunked."""

    def one(sl: slice) -> Tensor:
        with torch.no_grad(), autocast_ctx(ctx, x.device):
            return torch.softmax(model(x[sl]).float(), dim=1)

    return run_in_chunks(one, x.shape[0], ctx)


def resolve_target(
    model: nn.Module, images: Tensor, target: Tensor | Sequence[int] | int | None, max_batch: int = 256
) -> Tensor:
    """The explained class of every image (N,) int64: ``target`` as given (one class for all, or
    one per image), or the model's prediction when None."""
    n = images.shape[0]
    if target is None:
        return forward_probabilities(model, images, BatchContext(budget=max_batch)).argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.int64, device=images.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"target must hold one class per image ({n}), got shape {tuple(t.shape)}")
    return t
