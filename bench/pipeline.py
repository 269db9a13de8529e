"""The job's images/s against the same methods in a bare loop, on the same machine, in one run.

    python3 bench/pipeline.py [--images 512] [--workers 2]

Bare loop: images already decoded in memory, the same methods, model (parameters frozen, as the
job loads it) and batch size, no spectra, nothing written, one torch thread; the ideal job rate is
that times the number of workers (perfect scaling, zero overhead). We also print the bare loop
with every core in one process, which is slower on small models (intra-op threading does not pay).
The job: Parquet shards -> decode -> Ray actors (one thread each) -> Zarr store. The ratio
job / ideal is what orchestration, decoding and storage cost (target: >= 0.9). Job runs with and
without spectra alternate, best of ``--repeats`` each, to measure what the spectra add
(target: < 5% of attribution time).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distributed_attr import zoo  # noqa: E402
from distributed_attr.data import digits_uint8, write_parquet_shards  # noqa: E402
from distributed_attr.methods import Context, build_method, compute_maps  # noqa: E402
from distributed_attr.runner import run  # noqa: E402

METHODS = {"saliency": {}, "gradient_x_input": {}, "integrated_gradients": {"steps": 16},
           "smoothgrad": {"samples": 16}}


def bare_loop(x: torch.Tensor, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model, _ = zoo.pretrained("digits_cnn")
    for p in model.parameters():
        p.requires_grad_(False)
    methods = [build_method(n, p) for n, p in METHODS.items()]
    ctx = Context(seed=0, budget=256)
    compute_maps(model, x[:batch_size], model(x[:batch_size]).argmax(1), methods, ctx)  # warm-up
    t = time.perf_counter()
    for b in range(0, len(x), batch_size):
        xb = x[b:b + batch_size]
        with torch.no_grad():
            target = model(xb).argmax(1)
        batch_ctx = dataclasses.replace(ctx, indices=torch.arange(b, b + len(xb)))
        compute_maps(model, xb, target, methods, batch_ctx)
    return len(x) / (time.perf_counter() - t)


def job(data: Path, store: Path, workers: int, batch_size: int, spectra: bool, n: int) -> float:
    cfg = {
        "data": {"format": "parquet", "path": str(data), "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": str(store), "model": {"kind": "zoo", "name": "digits_cnn"}, "methods": METHODS,
        "spectra": {"enabled": spectra},
        "run": {"num_workers": workers, "unit_size": 64, "batch_size": batch_size},
    }
    s = run(cfg, overwrite=True, progress=False)
    assert s.units_done == s.units and not s.failures
    return s.images_per_second


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, object_store_memory=200_000_000,
             configure_logging=False)
    imgs, labels = digits_uint8(32, n=args.images, split="all")
    x = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_parquet_shards(tmp / "data", imgs, labels, shards=4)
        zoo.pretrained("digits_cnn")
        job(tmp / "data", tmp / "warm.zarr", args.workers, args.batch_size, False, args.images)  # warm caches
        plain, spectra = [], []
        for r in range(args.repeats):
            plain.append(job(tmp / "data", tmp / f"a{r}.zarr", args.workers, args.batch_size, False, args.images))
            spectra.append(job(tmp / "data", tmp / f"b{r}.zarr", args.workers, args.batch_size, True, args.images))
        j_plain, j_spectra = max(plain), max(spectra)
        bare1 = bare_loop(x, args.batch_size, threads=1)
        bare_all = bare_loop(x, args.batch_size, threads=args.workers)
    ray.shutdown()
    ideal = bare1 * args.workers
    names = ", ".join(f"{k}{v or ''}" for k, v in METHODS.items())
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, device cpu")
    print(f"methods: {names}; {args.images} digits at 32 px; batch {args.batch_size}; {args.workers} workers")
    print(f"bare loop, 1 thread                       {bare1:8.1f} images/s")
    print(f"bare loop, {args.workers} threads in one process       {bare_all:8.1f} images/s")
    print(f"ideal job ({args.workers} x 1-thread bare loop)          {ideal:8.1f} images/s")
    print(f"job, no spectra (best of {args.repeats})                {j_plain:8.1f} images/s   "
          f"ratio to ideal {j_plain / ideal:.3f} (target >= 0.9)")
    print(f"job, with spectra (best of {args.repeats})              {j_spectra:8.1f} images/s   spectra cost "
          f"{100 * (j_plain / j_spectra - 1):.1f}% of attribution time (target < 5%)")


if __name__ == "__main__":
    main()
