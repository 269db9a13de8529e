"""Metric cost: ours against Quantus 0.6 (or a one-image-at-a-time loop where Quantus has no
equivalent) on the same model, images, maps, parameters and machine, in one run.

    python3 bench/metrics.py [--images 64] [--repeats 3]

Pairs (same definitions, checked equal in tests/test_metrics_*.py):
  deletion    ours (steps 16, zero baseline)     vs quantus.PixelFlipping(features_in_step=H*W/16)
  insertion   ours (steps 16, blurred start)     vs a loop: one image, one step, one forward at a time
  mufidelity  ours (pixel grid, 64 subsets, Pearson) vs quantus.FaithfulnessCorrelation(nr_runs=64)
  sparseness  ours                               vs quantus.Sparseness
  complexity  ours                               vs quantus.Complexity

Also printed: each metric's time over the time of its forward passes done bare (the model alone on
already-built inputs in batches of ``max_batch``), i.e. what building perturbed inputs, chunking
and scoring add on top of the model.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--subsets", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=256)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import quantus

    torch.manual_seed(0)
    model, _ = zoo.pretrained("digits_cnn")
    xs, ys = zoo.digits_dataset(32)
    x, y = torch.from_numpy(xs[: args.images]), torch.from_numpy(ys[: args.images])
    maps = attribute(model, x, "integrated_gradients", y, steps=16)
    n, c, h, w = x.shape
    xn, yn, an = x.numpy(), y.numpy(), maps.numpy()[:, None].copy()
    steps, subsets, mb = args.steps, args.subsets, args.max_batch
    subset = round(0.2 * h * w)
    blurred = gaussian_blur(x)
    q = dict(disable_warnings=True, display_progressbar=False)

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
    print(f"digits_cnn, {n} images 1x{h}x{w}, IG maps; torch threads {torch.get_num_threads()}, "
          f"max_batch {mb}, best of {args.repeats}")
    print(f"{'metric':<11} {'ours s':>9} {'reference s':>12} {'ratio':>7}  {'ours/bare fwd':>13}  reference")
    for name, (ours, ref, ref_name, forwards) in pairs.items():
        t_ours = best_time(ours, args.repeats)
        t_ref = best_time(ref, 1 if "loop" in ref_name else args.repeats)
        bare = bare_forward_seconds(model, forwards, (c, h, w), mb, args.repeats) if forwards else float("nan")
        overhead = f"{t_ours / bare:13.2f}" if forwards else f"{'-':>13}"
        print(f"{name:<11} {t_ours:9.4f} {t_ref:12.4f} {t_ref / t_ours:6.1f}x  {overhead}  {ref_name}")


if __name__ == "__main__":
    main()
