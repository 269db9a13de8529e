"""Gradient statistics over noisy copies of the image: SmoothGrad, SquareGrad, VarGrad.

SmoothGrad (Smilkov et al. 2017) averages the gradient over ``samples`` copies x + e with
e ~ N(0, sigma^2), sigma = ``noise_level`` * (max(x) - min(x)) per image (the paper's "noise
level" is sigma relative to the image's value range). SquareGrad averages the squared gradient
(Hooker et al. 2019), VarGrad takes its variance (Adebayo et al. 2018). The three form the share
group "smoothgrad": the same noisy samples, drawn once, serve all of them, so asking for the three
costs one method's passes.

The noise of sample s of image i comes from a generator seeded by ``per_sample_seeds`` drawn from
the image's own generator: it does not depend on the batch, the device or the chunking, and
is drawn one chunk at a time (never samples x images x C x H x W at once).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import (
    Context,
    GroupedMethod,
    Method,
    NoisySampleParams,
    for_each_chunk,
    per_image_generators,
    per_sample_seeds,
    register,
    sample_randn,
    working_dtype,
)
from .gradient import gradient_pass

GROUP = "smoothgrad"


def noise_sigma(x: Tensor, noise_level: float) -> Tensor:
    """(N,) standard deviation per image: ``noise_level`` times the image's value range."""
    flat = x.reshape(x.shape[0], -1)
    return noise_level * (flat.amax(dim=1) - flat.amin(dim=1))


class NoiseSampler:
    """The noise of every (image, sample) pair of a batch, drawn on demand."""

    def __init__(self, x: Tensor, ctx: Context, samples: int, noise_level: float):
        gens = per_image_generators(ctx.seed, GROUP, ctx.indices_for(x.shape[0]))
        self.seeds = per_sample_seeds(gens, samples)  # (N, samples), on the CPU
        self.sigma = noise_sigma(x, noise_level)
        self.shape = tuple(x.shape[1:])
        self.samples = samples

    def noise(self, img: Tensor, sample: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(k, C, H, W) noise of the pairs (img[j], sample[j]), already scaled by sigma."""
        seeds = self.seeds[img.cpu(), sample.cpu()].tolist()
        unit = torch.stack([sample_randn(s, self.shape) for s in seeds]).to(device=device, dtype=dtype)
        return unit * self.sigma.to(device=device, dtype=dtype)[img].view(-1, 1, 1, 1)

    def all_noise(self, dtype=torch.float32, device="cpu") -> Tensor:
        """(N, samples, C, H, W): every pair's noise (for tests and references, not for runs)."""
        n = self.seeds.shape[0]
        img = torch.arange(n).repeat_interleave(self.samples)
        sample = torch.arange(self.samples).repeat(n)
        return self.noise(img, sample, dtype, torch.device(device)).view(n, self.samples, *self.shape)


def gradient_moments(
    model: nn.Module, x: Tensor, target: Tensor, ctx: Context, samples: int, noise_level: float
) -> tuple[Tensor, Tensor]:
    """Mean and mean square, over the noisy samples, of the input gradient: two (N, C, H, W).

    Sums accumulate in float64 so that VarGrad's E[g^2] - E[g]^2 does not cancel badly."""
    dtype = working_dtype(x)
    x = x.detach().to(dtype)
    sampler = NoiseSampler(x, ctx, samples, noise_level)
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)

    def one(sl: slice) -> None:
        pair = torch.arange(sl.start, sl.stop, device=x.device)
        img, sample = pair // samples, pair % samples
        noisy = x[img] + sampler.noise(img, sample, dtype, x.device)
        grad = gradient_pass(model, noisy, target[img], ctx).input_grad.double()  # type: ignore[union-attr]
        total.index_add_(0, img, grad)
        total_sq.index_add_(0, img, grad * grad)

    for_each_chunk(one, x.shape[0] * samples, ctx)
    return total / samples, total_sq / samples


@register
class SmoothGrad(GroupedMethod):
    """SmoothGrad: the gradient averaged over noisy copies of the image, summed over channels."""

    name = "smoothgrad"
    compile_safe = True
    family = "gradient"
    signed = True
    share_group = GROUP
    channel_rule = "sum over channels of the per-channel mean gradient"

    @dataclass
    class Params(NoisySampleParams):
        """``samples`` = 50 noisy copies; noise std = ``noise_level`` (0.15) x the image's value range."""

    def cost(self) -> float:
        return float(self.params.samples)

    def from_moments(self, mean: Tensor, mean_sq: Tensor) -> Tensor:
        return mean.sum(dim=1)

    @classmethod
    def attribute_group(
        cls, methods: Sequence[Method], model: nn.Module, x: Tensor, target: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        # Members share samples only when they ask for the same ones.
        by_params: dict[tuple, list[SmoothGrad]] = {}
        for m in methods:
            by_params.setdefault(tuple(dataclasses.astuple(m.params)), []).append(m)  # type: ignore[arg-type]
        out: dict[str, Tensor] = {}
        for members in by_params.values():
            p = members[0].params
            mean, mean_sq = gradient_moments(model, x, target, ctx, p.samples, p.noise_level)
            for m in members:
                out[m.name] = m.from_moments(mean, mean_sq).to(working_dtype(x))
        return out


@register
class SquareGrad(SmoothGrad):
    """SquareGrad: the squared gradient averaged over noisy copies, summed over channels."""

    name = "squaregrad"
    signed = False
    channel_rule = "sum over channels of the per-channel mean squared gradient"

    def from_moments(self, mean: Tensor, mean_sq: Tensor) -> Tensor:
        return mean_sq.sum(dim=1)


@register
class VarGrad(SmoothGrad):
    """VarGrad: the variance of the gradient over noisy copies, summed over channels."""

    name = "vargrad"
    signed = False
    channel_rule = "sum over channels of the per-channel gradient variance (population, ddof=0)"

    def from_moments(self, mean: Tensor, mean_sq: Tensor) -> Tensor:
        return (mean_sq - mean * mean).clamp(min=0).sum(dim=1)
