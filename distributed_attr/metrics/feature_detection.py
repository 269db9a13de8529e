"""Feature detection across architectures (Kadir, Addluri & Sonntag 2023, after Gupta et al. 2022).

The features of an image are x * M, where the mask M keeps the top ``keep`` fraction of pixels of
the map (on every channel) and sets the rest to the baseline (0 by default). The features go to
the explaining model and to every evaluator (other models trained on the same data): if a map
found what the class "looks like", the features alone should still be recognised, by the model
that was explained and by other architectures. Outputs, per evaluator (index 0 = "self", the
explaining model) and keep level: the probability of the explained class and whether the
evaluator's prediction is still that class (1.0 / 0.0, so its mean is an accuracy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..commons import autocast_ctx, run_in_chunks
from .base import Metric, MetricContext, baseline_images, check_baseline, pixel_ranks, register


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


def kept_pixel_counts(n_pixels: int, keep: tuple[float, ...]) -> list[int]:
    return [min(n_pixels, max(1, int(round(k * n_pixels)))) for k in keep]


@register
class FeatureDetection(Metric):
    """Is the class still recognised, by this and by other models, from the top pixels of the map alone?"""

    name = "feature_detection"
    higher_is_better = True
    score_output = "score"

    @dataclass
    class Params:
        #: fractions of pixels kept
        keep: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
        #: "signed": most positive pixels kept; "absolute": largest magnitude kept
        order: Literal["signed", "absolute"] = "signed"
        #: value of the pixels not kept
        baseline: str | float = "zero"
        blur_size: int = 11
        blur_sigma: float = 5.0

        def validate(self) -> None:
            if not self.keep or any(not 0.0 < k <= 1.0 for k in self.keep):
                raise ValueError(f"keep levels must lie in (0, 1], got {list(self.keep)}")
            check_baseline(self.baseline)

    def evaluator_names(self, ctx: MetricContext) -> list[str]:
        names = ctx.evaluator_names if ctx.evaluator_names is not None else tuple(ctx.evaluators)
        return ["self", *[name for name in names if name != "self"]]

    def outputs(self, ctx: MetricContext):
        dims = ("evaluator", "keep")
        shape = (len(self.evaluator_names(ctx)), len(self.params.keep))
        return {"probability": (dims, shape), "correct": (dims, shape), "score": ((), ())}

    def coords(self, ctx: MetricContext) -> dict[str, list]:
        return {"evaluator": self.evaluator_names(ctx), "keep": [float(k) for k in self.params.keep]}

    def cost(self) -> float:
        return float(len(self.params.keep))

    def evaluate(self, model, x, maps, target, ctx):
        p = self.params
        n, c, h, w = x.shape
        dev = x.device
        target = target.to(dev)
        ranks, _ = pixel_ranks(maps.to(dev), 1, p.order)
        ranks = ranks.view(n, 1, h, w)
        counts = torch.tensor(kept_pixel_counts(h * w, p.keep), device=dev)
        base = baseline_images(x, p.baseline, ctx, p.blur_size, p.blur_sigma)
        k = len(p.keep)
        models = [model] + [ctx.evaluators[name] for name in self.evaluator_names(ctx)[1:]]

        probability, correct = [], []
        for m in models:
            mdev = _device_of(m, dev)

            def one(sl: slice, m=m, mdev=mdev) -> Tensor:
                idx = torch.arange(sl.start, sl.stop, device=dev)
                img, level = idx // k, idx % k
                kept = ranks[img] < counts[level].view(-1, 1, 1, 1)
                features = torch.where(kept, x[img], base[img]).to(mdev)
                with torch.no_grad(), autocast_ctx(ctx, mdev):
                    logits = m(features).float()
                t = target[img].to(mdev)
                prob = torch.softmax(logits, dim=1).gather(1, t.view(-1, 1)).squeeze(1)
                hit = (logits.argmax(dim=1) == t).float()
                return torch.stack([prob, hit], dim=1).to(dev)

            res = run_in_chunks(one, n * k, ctx).view(n, k, 2)
            probability.append(res[..., 0])
            correct.append(res[..., 1])
        prob_t = torch.stack(probability, dim=1)  # (N, E, K)
        corr_t = torch.stack(correct, dim=1)
        return {"probability": prob_t, "correct": corr_t, "score": prob_t[:, 0].mean(dim=1)}
