"""Metric cost: ours against Quantus 0.6 (or a one-image-at-a-time loop where Quantus has no
equivalent) on the same model, images, maps, parameters and machine, in one run.

    python3 bench/metrics.py [--images 64] [--repeats 3] [--only GROUP_OR_METRIC,...] [--threads N]

Groups (``--only``): faithfulness (deletion, insertion, mufidelity), complexity (sparseness,
complexity), localisation (the six below), robustness (max/avg sensitivity); or metric names.

Pairs (same definitions, checked equal in tests/test_metrics_*.py):
  deletion    ours (steps 16, zero baseline)     vs quantus.PixelFlipping(features_in_step=H*W/16)
  insertion   ours (steps 16, blurred start)     vs a loop: one image, one step, one forward at a time
  mufidelity  ours (pixel grid, 64 subsets, Pearson) vs quantus.FaithfulnessCorrelation(nr_runs=64)
  sparseness  ours                               vs quantus.Sparseness
  complexity  ours                               vs quantus.Complexity

Localisation (``--loc-images`` images, default 256; saliency maps; one square mask per image,
side 6..20 px and position drawn from torch.Generator seed 0; Quantus's defaults but k, ``--top-k``):
  pointing_game, attribution_localisation, top_k_intersection (k=100), relevance_mass_accuracy,
  relevance_rank_accuracy, auc   vs quantus.PointingGame, AttributionLocalisation, TopKIntersection,
  RelevanceMassAccuracy, RelevanceRankAccuracy, AUC (model=None, s_batch = the masks)

Robustness (``--rob-images`` images, default 256; saliency maps, recomputed by saliency on the
perturbed inputs; ``--nr-samples`` 8, lower_bound 0.2, Frobenius norms, Quantus's defaults):
  max_sensitivity, avg_sensitivity   vs quantus.MaxSensitivity, AvgSensitivity (its own uniform
  noise: the draws differ, so the scores are not compared here; tests/test_metrics_robustness.py
  replays our draws through Quantus and finds them equal)

Also printed: each metric's time over the time of its forward passes done bare (the model alone on
already-built inputs in batches of ``max_batch``), i.e. what building perturbed inputs, chunking
and scoring add on top of the model; for the robustness rows, over the time of its explanations
done bare (saliency of N * nr_samples ready-made inputs in batches of ``max_batch``). For the
localisation rows, the largest |ours - Quantus| over the images (a NaN in both counts as equal).

``--threads 1`` when other processes load the machine: torch's intra-op threads then wait on
each other, which slows our millisecond-sized batched ops many-fold and Quantus's single-threaded
per-image NumPy loops not at all (docs/benchmarks-metrics.md, 2026-11-30).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distributed_attr import zoo  # noqa: E402
from distributed_attr.methods import attribute  # noqa: E402
from distributed_attr.metrics import evaluate  # noqa: E402
from distributed_attr.metrics.base import gaussian_blur  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bare_forward_seconds(model, n_samples: int, shape, max_batch: int, repeats: int) -> float:
    x = torch.rand(min(n_samples, max_batch), *shape)

    def run():
        done = 0
        with torch.no_grad():
            while done < n_samples:
                b = min(max_batch, n_samples - done)
                model(x[:b])
                done += b

    return best_time(run, repeats)


def bare_explain_seconds(explain, x, y, n_rows: int, max_batch: int, repeats: int) -> float:
    """``explain`` on ``n_rows`` ready-made inputs (rows of ``x`` repeated) in batches of ``max_batch``."""
    reps = -(-min(n_rows, max_batch) // len(x))
    xb, yb = x.repeat(reps, 1, 1, 1)[:max_batch], y.repeat(reps)[:max_batch]

    def run():
        done = 0
        while done < n_rows:
            b = min(len(xb), n_rows - done)
            explain(xb[:b], yb[:b])
            done += b

    return best_time(run, repeats)


def square_masks(n: int, h: int, w: int, seed: int = 0, sides=(6, 20)) -> torch.Tensor:
    """(n, h, w) bool: one axis-aligned square per image, side uniform in ``sides`` (inclusive) and
    top-left corner uniform over the positions that keep it inside, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        side = int(torch.randint(sides[0], sides[1] + 1, (1,), generator=g))
        y0 = int(torch.randint(0, h - side + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - side + 1, (1,), generator=g))
        masks[i, y0:y0 + side, x0:x0 + side] = True
    return masks


def max_abs_diff(ours, ref) -> float:
    """Largest |ours - ref| over images; NaN in both counts as equal, NaN in one as inf."""
    a = np.asarray(ours, dtype=np.float64).ravel()
    b = np.asarray(ref, dtype=np.float64).ravel()
    both = np.isnan(a) & np.isnan(b)
    d = np.where(both, 0.0, np.abs(a - b))
    return float(np.nan_to_num(d, nan=np.inf).max())


def insertion_loop(model, x, maps, y, steps, blurred):
    """The plain way: every image, every step, one forward pass of one image."""
    n, _, h, w = x.shape
    out = np.zeros((n, steps + 1))
    for i in range(n):
        order = np.argsort(-maps[i].numpy().ravel(), kind="stable")
        for k in range(steps + 1):
            keep = np.zeros(h * w, dtype=bool)
            keep[order[: (k * h * w) // steps]] = True
            img = torch.where(torch.from_numpy(keep.reshape(1, h, w)), x[i], blurred[i])
            with torch.no_grad():
                out[i, k] = torch.softmax(model(img[None]), 1)[0, y[i]].item()
    return out


GROUPS = {
    "faithfulness": ("deletion", "insertion", "mufidelity"),
    "complexity": ("sparseness", "complexity"),
    "localisation": ("pointing_game", "attribution_localisation", "top_k_intersection",
                     "relevance_mass_accuracy", "relevance_rank_accuracy", "auc"),
    "robustness": ("max_sensitivity", "avg_sensitivity"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--loc-images", type=int, default=256, help="images for the localisation rows")
    ap.add_argument("--top-k", type=int, default=100, help="k of top_k_intersection (pixels)")
    ap.add_argument("--rob-images", type=int, default=256, help="images for the robustness rows")
    ap.add_argument("--nr-samples", type=int, default=8, help="perturbed inputs per image (robustness)")
    ap.add_argument("--only", default="", help="comma-separated groups or metric names (default: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import quantus

    wanted = set()
    for item in filter(None, (t.strip() for t in args.only.split(","))):
        if item in GROUPS:
            wanted.update(GROUPS[item])
        elif any(item in names for names in GROUPS.values()):
            wanted.add(item)
        else:
            ap.error(f"--only: {item!r} is neither a group ({', '.join(GROUPS)}) nor a metric")
    if not wanted:
        wanted = {name for names in GROUPS.values() for name in names}

    torch.manual_seed(0)
    model, _ = zoo.pretrained("digits_cnn")
    xs, ys = zoo.digits_dataset(32)
    mb = args.max_batch
    q = dict(disable_warnings=True, display_progressbar=False)
    _, c, h, w = xs.shape
    print(f"digits_cnn, images 1x{h}x{w}; torch threads {torch.get_num_threads()}, "
          f"max_batch {mb}, best of {args.repeats}")
    print(f"{'metric':<24} {'N':>4} {'ours s':>9} {'reference s':>12} {'ratio':>7}  {'ours/bare':>9}  "
          f"{'max|diff|':>9}  reference")

    def report(name, n, ours, ref, ref_name, bare=None, check=None, ref_repeats=None):
        t_ours = best_time(ours, args.repeats)
        t_ref = best_time(ref, args.repeats if ref_repeats is None else ref_repeats)
        overhead = f"{t_ours / bare():9.2f}" if bare else f"{'-':>9}"
        diff = f"{check():9.1e}" if check else f"{'-':>9}"
        print(f"{name:<24} {n:>4} {t_ours:9.4f} {t_ref:12.4f} {t_ref / t_ours:6.1f}x  {overhead}  {diff}  {ref_name}",
              flush=True)

    # faithfulness and complexity: IG maps of the first --images images (as before)
    if wanted & set(GROUPS["faithfulness"] + GROUPS["complexity"]):
        x, y = torch.from_numpy(xs[: args.images]), torch.from_numpy(ys[: args.images])
        maps = attribute(model, x, "integrated_gradients", y, steps=16)
        n = x.shape[0]
        xn, yn, an = x.numpy(), y.numpy(), maps.numpy()[:, None].copy()
        steps, subsets = args.steps, args.subsets
        subset = round(0.2 * h * w)
        blurred = gaussian_blur(x)

        pairs = {
            "deletion": (
                lambda: evaluate(model, x, maps, "deletion", y, steps=steps, baseline="zero", max_batch=mb),
                lambda: quantus.PixelFlipping(features_in_step=h * w // steps, perturb_baseline=0.0, **q)(
                    model=model, x_batch=xn, y_batch=yn, a_batch=an, device="cpu", softmax=True, batch_size=n),
                "quantus.PixelFlipping", n * (steps + 1),
            ),
            "insertion": (
                lambda: evaluate(model, x, maps, "insertion", y, steps=steps, baseline="blur", max_batch=mb),
                lambda: insertion_loop(model, x, maps, y, steps, blurred),
                "one-image loop", n * (steps + 1),
            ),
            "mufidelity": (
                lambda: evaluate(model, x, maps, "mufidelity", y, grid=h, n_subsets=subsets, correlation="pearson",
                                 baseline=0.0, max_batch=mb),
                lambda: quantus.FaithfulnessCorrelation(nr_runs=subsets, subset_size=subset, perturb_baseline=0.0,
                                                        return_aggregate=False, **q)(
                    model=model, x_batch=xn, y_batch=yn, a_batch=an, device="cpu", softmax=True, batch_size=n),
                "quantus.FaithfulnessCorrelation", n * (subsets + 1),
            ),
            "sparseness": (
                lambda: evaluate(None, x, maps, "sparseness"),
                lambda: quantus.Sparseness(**q)(model=None, x_batch=xn, y_batch=yn, a_batch=an.copy(), batch_size=n),
                "quantus.Sparseness", 0,
            ),
            "complexity": (
                lambda: evaluate(None, x, maps, "complexity"),
                lambda: quantus.Complexity(**q)(model=None, x_batch=xn, y_batch=yn, a_batch=an.copy(), batch_size=n),
                "quantus.Complexity", 0,
            ),
        }
        print(f"-- IG maps (16 steps) of the first {n} images")
        for name, (ours, ref, ref_name, forwards) in pairs.items():
            if name not in wanted:
                continue
            bare = None
            if forwards:
                bare = lambda f=forwards: bare_forward_seconds(model, f, (c, h, w), mb, args.repeats)
            report(name, n, ours, ref, ref_name, bare=bare, ref_repeats=1 if "loop" in ref_name else None)

    def saliency(xb, tb):
        return attribute(model, xb, "saliency", tb)

    if wanted & set(GROUPS["localisation"]):
        x, y = torch.from_numpy(xs[: args.loc_images]), torch.from_numpy(ys[: args.loc_images])
        n = x.shape[0]
        maps = saliency(x, y)
        masks = square_masks(n, h, w, seed=0)
        xn, yn = x.numpy(), y.numpy()
        an = maps.numpy()[:, None].astype(np.float32)
        sn = masks.numpy()[:, None].astype(np.float32)
        loc = {
            "pointing_game": ("PointingGame", {}),
            "attribution_localisation": ("AttributionLocalisation", {}),
            "top_k_intersection": ("TopKIntersection", {"k": args.top_k}),
            "relevance_mass_accuracy": ("RelevanceMassAccuracy", {}),
            "relevance_rank_accuracy": ("RelevanceRankAccuracy", {}),
            "auc": ("AUC", {}),
        }
        print(f"-- saliency maps of the first {n} images, one square mask each "
              f"({int(masks.sum((1, 2)).min())}..{int(masks.sum((1, 2)).max())} px)")
        for name, (cls, params) in loc.items():
            if name not in wanted:
                continue
            ours = lambda name=name, params=params: evaluate(None, x, maps, name, masks=masks, **params)
            ref = lambda cls=cls, params=params: getattr(quantus, cls)(**params, **q)(
                model=None, x_batch=xn, y_batch=yn, a_batch=an.copy(), s_batch=sn.copy(), batch_size=n)

            def check(name=name, ours=ours, ref=ref):
                got = ours()
                return max_abs_diff(next(iter(got.values())).numpy(), ref())

            ps = ", ".join(f"{k}={v}" for k, v in params.items())
            report(name, n, ours, ref, f"quantus.{cls}({ps})", check=check)

    if wanted & set(GROUPS["robustness"]):
        x, y = torch.from_numpy(xs[: args.rob_images]), torch.from_numpy(ys[: args.rob_images])
        n, s = x.shape[0], args.nr_samples
        maps = saliency(x, y)
        xn, yn, an = x.numpy(), y.numpy(), maps.numpy()[:, None].copy()

        def quantus_explain(model, inputs, targets, **kw):
            return saliency(torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(targets))).numpy()

        rob = {"max_sensitivity": "MaxSensitivity", "avg_sensitivity": "AvgSensitivity"}
        print(f"-- saliency maps of the first {n} images, recomputed on {s} perturbed inputs each "
              f"(lower_bound 0.2)")
        for name, cls in rob.items():
            if name not in wanted:
                continue
            ours = lambda name=name: evaluate(model, x, maps, name, y, explain=saliency, samples=s,
                                              lower_bound=0.2, max_batch=mb)
            ref = lambda cls=cls: getattr(quantus, cls)(nr_samples=s, lower_bound=0.2, **q)(
                model=model, x_batch=xn, y_batch=yn, a_batch=an.copy(), explain_func=quantus_explain,
                device="cpu", batch_size=n)
            bare = lambda: bare_explain_seconds(saliency, x, y, n * s, mb, args.repeats)
            report(name, n, ours, ref, f"quantus.{cls}(nr_samples={s})", bare=bare)


if __name__ == "__main__":
    main()
