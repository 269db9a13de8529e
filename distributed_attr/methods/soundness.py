"""Soundness Saliency (Gupta, Saunshi, Yu, Lyu & Arora, NeurIPS 2022).

A mask M = sigmoid(logits), logits of size (H / ``downsample``) x (W / ``downsample``) started at
0 (M = 0.5), upsampled bilinearly to H x W, keeps the image where M is high and fills the rest
with other natural images n: the composite x * M + n * (1 - M) (M on every channel). The mask
minimises, per image,

    -log E_n[ softmax(f(x * M + n * (1 - M)))_target ] + l1 * (224 * 224 / (H * W)) * sum(M) + tv * TV(M)

with ``backgrounds`` backgrounds n per step, TV the sum of squared differences between vertical
and horizontal neighbours of the upsampled mask, Adam at ``lr`` for ``steps`` steps. The map is
the final M at input resolution (unsigned, in [0, 1]).

The weights are defined at the reference size of 224 x 224 px, where the paper tuned them (like
the FORGrad cutoffs, given at 224 px and scaled to the image), and mean the same at every size:

- ``l1`` weighs sum(M) over a 224 x 224 image; at H x W it is multiplied by 224^2 / (H W), so the
  penalty is l1 * 224^2 * mean(M), a price on the *fraction* of the image kept. Unscaled, the
  sparsity term of a 32-px image would be 49x weaker than at 224 px against a fit term that does
  not depend on the size.
- ``tv`` is not scaled: for a given mask shape the sum of squared neighbour differences does not
  depend on the resolution (a difference over one pixel shrinks as 1/H while the number of pairs
  grows as H W, so the sum tends to the integral of |grad M|^2 over the image).

With both, the balance L1 : TV : fit is the same at every size, and so is the mask, up to the
resolution of the logits (measured on a model reading one patch of 6/32 of the image side, 150
steps: mask inside 0.74 / 0.77 / 0.77 and outside 0.05 / 0.04 / 0.04 at 32 / 64 / 224 px;
unscaled, 32 px gave 0.91 inside and 0.73 outside).

Backgrounds come from ``ctx.references`` (other images of the dataset, drawn per image and per
step from ``per_image_generators``). Without reference images the other images of the batch serve,
rolled: image i uses images i+1, i+2, ... (mod N); those maps then depend on the batch.

``objective="kadir"`` replaces the first term by the objective of Kadir et al. (KI 2023),
maximising E_n[-f_i log f_i]. -p log p is not monotonic: it peaks at p = 1/e, so this objective
pulls the target probability towards 0.37 rather than towards confidence.

The whole batch is optimised at once: the loss is a sum of per-image terms and Adam works
element-wise, so each image follows exactly the trajectory it would follow alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Context, Method, autocast_ctx, for_each_chunk, per_image_generators, register


def total_variation(mask: Tensor) -> Tensor:
    """(k,) sum of squared differences between vertical and horizontal neighbours of (k, 1, H, W)."""
    dv = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    dh = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return dv + dh


def fit_term(probs: Tensor, objective: str) -> Tensor:
    """(k,) the term to minimise from (k, R) target probabilities over R backgrounds.

    "soundness": -log of the mean probability (the paper's cross-entropy of the averaged
    prediction). "kadir": -E[-p log p], i.e. maximise the expected -p log p (peaks at p = 1/e)."""
    if objective == "soundness":
        return -torch.log(probs.mean(dim=1).clamp_min(1e-12))
    if objective == "kadir":
        return (probs * torch.log(probs.clamp_min(1e-12))).mean(dim=1)
    raise ValueError(f"objective must be 'soundness' or 'kadir', got {objective!r}")


@register
class SoundnessSaliency(Method):
    """Soundness Saliency: a mask optimised so the kept region alone, on other images' backgrounds, still gives the class."""

    name = "soundness_saliency"
    compile_safe = True
    family = "optimisation"
    signed = False
    needs_references = True
    channel_rule = "none needed: one mask multiplies every channel"

    @dataclass
    class Params:
        steps: int = 2000
        lr: float = 0.05
        #: weight of sum(M) over a 224 x 224 image (the paper's 2e-5); scaled by 224^2 / (H W)
        l1: float = 2e-5
        #: weight of TV(M), the same at every size (the paper's 0.01)
        tv: float = 0.01
        #: the image side (px) at which ``l1`` is defined: 224, where the paper tuned it. ``null``:
        #: ``l1`` weighs sum(M) at the image's own size, as versions before 0.2 did (a store made
        #: then has no such key, so a resume with today's meaning is refused)
        l1_reference_size: int | None = 224
        #: backgrounds per image per step, drawn from the reference images (probabilities averaged
        #: over them; "references" before 2026-11-30)
        backgrounds: int = 10
        #: the mask's logits live at input size / downsample
        downsample: int = 4
        objective: Literal["soundness", "kadir"] = "soundness"

        RENAMED: ClassVar[dict] = {"references": ("backgrounds", None)}

        def validate(self) -> None:
            if self.steps < 0 or self.backgrounds < 1 or self.downsample < 1:
                raise ValueError("steps must be >= 0, backgrounds and downsample >= 1")
            if self.lr <= 0:
                raise ValueError("lr must be > 0")
            if self.l1_reference_size is not None and self.l1_reference_size < 1:
                raise ValueError("l1_reference_size must be >= 1 (px) or null")

    def cost(self) -> float:
        return float(self.params.steps * self.params.backgrounds)

    @staticmethod
    def l1_weight(l1: float, height: int, width: int, reference: int | None = 224) -> float:
        """The L1 weight applied to sum(M) of an H x W mask: ``l1`` (defined at ``reference`` x
        ``reference`` px) times reference^2 / (H W), so that the penalty is
        ``l1 * reference^2 * mean(M)`` at every size; ``reference`` None: ``l1`` as it is."""
        return l1 if reference is None else l1 * (reference**2 / (height * width))

    @staticmethod
    def mask_of(logits: Tensor, size: tuple[int, int]) -> Tensor:
        """(k, 1, H, W) mask from (k, 1, h, w) logits: sigmoid, then bilinear upsampling."""
        m = torch.sigmoid(logits)
        if tuple(m.shape[-2:]) == tuple(size):
            return m
        return F.interpolate(m, size=size, mode="bilinear", align_corners=False)

    def background_plan(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """The background pool (R, C, H, W) and, per image and step, which of its images to use:
        (N, steps, backgrounds) indices into the pool."""
        p = self.params
        n = x.shape[0]
        if ctx.references is not None:
            pool = ctx.references.detach().to(device=x.device, dtype=x.dtype)
            if pool.dim() != 4 or pool.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"ctx.references must be (R, C, H, W) images shaped like the batch {tuple(x.shape[1:])}, "
                    f"got {tuple(pool.shape)}"
                )
            gens = per_image_generators(ctx.seed, self.name, ctx.indices_for(n))
            picks = torch.stack(
                [torch.randint(0, pool.shape[0], (p.steps, p.backgrounds), generator=g) for g in gens]
            )
            return pool, picks.to(x.device)
        if n < 2:
            raise ValueError(
                "soundness_saliency needs background images: pass ctx.references (other images of the "
                "dataset) or a batch of at least 2 images"
            )
        refs = min(p.backgrounds, n - 1)
        rolled = (torch.arange(n)[:, None] + torch.arange(1, refs + 1)[None, :]) % n  # (N, refs)
        return x, rolled[:, None, :].expand(n, p.steps, refs).to(x.device)

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor, ctx: Context) -> Tensor:
        p = self.params
        n, _, height, width = x.shape
        size = (height, width)
        x = x.detach().float() if x.dtype != torch.float64 else x.detach()
        pool, picks = self.background_plan(x, ctx)
        refs = picks.shape[2]
        small = (max(1, height // p.downsample), max(1, width // p.downsample))
        logits = torch.zeros(n, 1, *small, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=p.lr)
        # Chunks hold whole images (all their backgrounds), since the loss averages over them.
        l1 = self.l1_weight(p.l1, height, width, p.l1_reference_size)
        # an out-of-memory error that halves these chunks lowers the caller's budget with them
        sub = dataclasses.replace(ctx, budget=ctx.budget.per(refs))

        for step in range(p.steps):
            grad_total = torch.zeros_like(logits)

            def one(sl: slice) -> None:
                with torch.enable_grad():
                    m = self.mask_of(logits[sl], size)  # (k, 1, H, W)
                    bg = pool[picks[sl, step]]  # (k, refs, C, H, W)
                    composite = x[sl, None] * m[:, None] + bg * (1 - m[:, None])
                    with autocast_ctx(ctx, x.device):
                        out = model(composite.flatten(0, 1))
                    probs = torch.softmax(out.to(x.dtype), dim=1)
                    probs = probs.gather(1, target[sl].repeat_interleave(refs).view(-1, 1).to(out.device))
                    loss = fit_term(probs.view(-1, refs), p.objective)
                    loss = loss + l1 * m.sum(dim=(1, 2, 3)) + p.tv * total_variation(m)
                    (g,) = torch.autograd.grad(loss.sum(), logits)
                grad_total.add_(g)

            for_each_chunk(one, n, sub)
            logits.grad = grad_total
            opt.step()
        with torch.no_grad():
            return self.mask_of(logits, size).squeeze(1)
