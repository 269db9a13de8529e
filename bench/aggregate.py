"""Benchmarks for the spectral functions and the aggregation job.

    python3 bench/aggregate.py [--part spectral|aggregate|all] [--images 4096] [--size 64]

spectral  cost per map of what a worker does for every map (radial spectrum of the unfiltered map
          and of the map low-passed at each of the 10 sweep cutoffs, high-frequency fractions),
          as a share of the saliency time per image of the model that made the maps: zoo
          digits_cnn at 32 px and torchvision resnet18 (random weights) at 224 px. Measured in one
          run, interleaved, on one torch thread (one CPU per worker, the job's default).
aggregate a synthetic store following the schema (default 8,192 maps of 64 x 64 for each of 2
          methods, float16, units of 256) read (a) by a single plain-zarr reader in one process,
          shard by shard, reading the same arrays and computing nothing, (b) by the job in
          process (num_workers=0), also with its reads through zarr (the ShardReader ablation),
          (c) by the job on local Ray: 1 task of 2 threads (the default), and 1, 2, 4, ... tasks
          of one thread each up to the machine's CPUs (the scaling with workers, one core each). maps/s = images x
          methods per second of the read phase; MB/s = decoded bytes.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns (fair under shared load)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_spectral(reps: int = 7) -> None:
    import torchvision

    from distributed_attr import zoo
    from distributed_attr.methods import attribute
    from distributed_attr.spectral import (
        REFERENCE_SWEEP,
        cutoff_sweep_spectra,
        high_frequency_fraction,
        high_frequency_fraction_from_spectrum,
        low_pass,
        radial_bin_counts,
        radial_spectrum,
        scaled_cutoffs,
    )

    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}  (one CPU per worker)")
    x32, _ = zoo.digits_dataset(32)
    cnn, _ = zoo.pretrained("digits_cnn")
    resnet = torchvision.models.resnet18(weights=None).eval()
    cases = [
        ("digits_cnn", cnn, torch.from_numpy(x32[:64]), 32),
        ("resnet18", resnet, torch.rand(8, 3, 224, 224), 224),
    ]
    print("| model | px | saliency ms/img | radial_spectrum ms/map | sweep (11 spectra + HF) ms/map "
          "| share of saliency | per-cutoff loop ms/map | share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, x, size in cases:
        n = x.shape[0]
        maps = attribute(model, x, "saliency")
        cutoffs = [math.inf] + scaled_cutoffs(REFERENCE_SWEEP, size)
        counts = torch.from_numpy(radial_bin_counts(size, size)).float()

        def sweep():
            freqs, raw = radial_spectrum(maps)  # unfiltered: the raw map
            _, filt = cutoff_sweep_spectra(maps, cutoffs[1:], kind="forgrad")
            spectra = torch.cat([raw[:, None], filt], 1)
            return high_frequency_fraction_from_spectrum(freqs, spectra, counts, 0.25)

        def per_cutoff_loop():  # low_pass + radial_spectrum + high_frequency_fraction per cutoff
            variants = [maps if math.isinf(c) else low_pass(maps, c) for c in cutoffs]
            torch.stack([radial_spectrum(v)[1] for v in variants], 1)
            torch.stack([high_frequency_fraction(v, 0.25) for v in variants], 1)

        t = _interleaved({
            "saliency": lambda: attribute(model, x, "saliency"),
            "radial": lambda: radial_spectrum(maps),
            "sweep": sweep,
            "loop": per_cutoff_loop,
        }, reps)
        ms = {k: 1e3 * v / n for k, v in t.items()}
        print(f"| {name} | {size} | {ms['saliency']:.3f} | {ms['radial']:.4f} | {ms['sweep']:.3f} | "
              f"{100 * ms['sweep'] / ms['saliency']:.1f} % | {ms['loop']:.3f} | "
              f"{100 * ms['loop'] / ms['saliency']:.1f} % |")


def _single_reader(store: str, read_maps: bool = True) -> tuple[int, int]:
    """Plain zarr in one process: the same arrays the job reads, shard by shard, no compute."""
    import zarr

    root = zarr.open_group(store, mode="r")
    unit = int(root.attrs["unit_size"])
    n_images = int(root.attrs["n_images"])
    methods = list(root.attrs["methods"])
    names = [f"spectra/{m}" for m in methods] + [f"hf_fraction/{m}" for m in methods]
    if read_maps:
        names += [f"maps/{m}" for m in methods]
    arrays = [root["ok"], root["target"]] + [root[n] for n in names]
    images = nbytes = 0
    for u in np.flatnonzero(root["units/done"][:] == 1):
        sl = slice(u * unit, min(n_images, (u + 1) * unit))
        for a in arrays:
            nbytes += a[sl].nbytes
        images += sl.stop - sl.start
    return images * len(methods), nbytes


def _disk_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_aggregate(n_images: int, size: int, reps: int, workdir: str, classes: int = 10) -> None:
    import dataclasses

    import ray

    from distributed_attr.aggregate import job as agg
    from distributed_attr.aggregate.synthetic import write_synthetic_store

    store = os.path.join(workdir, "bench.zarr")
    t = time.perf_counter()
    write_synthetic_store(store, n_images=n_images, unit_size=256, height=size, seed=1, n_classes=classes)
    print(f"synthetic store: {n_images} images of {classes} classes x 2 methods, {size}x{size} float16 maps, spectra "
          f"(11 cutoffs), units of 256: {_disk_bytes(store) / 1e6:.1f} MB on disk, "
          f"written in {time.perf_counter() - t:.1f} s")
    out = os.path.join(workdir, "out")
    # Ray first, so that every variant runs beside Ray's own processes (they take CPU too)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), object_store_memory=200_000_000, include_dashboard=False,
             configure_logging=False)
    print(f"ray.init {time.perf_counter() - t0:.1f} s")

    def job(read_maps, **kw):
        def run():
            r = agg.run_aggregation(store, out_dir=out, read_maps=read_maps, plots=False, **kw)
            return r["read_seconds"], r["images"] * len(r["methods"]), r["bytes_read"]
        return run

    def in_process_zarr_reads(read_maps):  # the ablation: the same job, every read through zarr
        from distributed_attr.io.store import AttributionStore

        handle = AttributionStore.open(store, mode="r")
        plan = dataclasses.replace(agg.make_plan(store, handle.group, read_maps), fast_reads=False)
        done = handle.done_units()
        plan.class_maps = agg._count_classes(handle, handle.usable()) <= agg.CLASS_MAPS  # as run_aggregation does
        units = done.tolist()

        def run():
            t0 = time.perf_counter()
            part = agg.aggregate_units(plan, units)
            return time.perf_counter() - t0, part.images * len(plan.methods), part.bytes_read
        return run

    def single(read_maps):
        def run():
            t0 = time.perf_counter()
            maps, nbytes = _single_reader(store, read_maps)
            return time.perf_counter() - t0, maps, nbytes
        return run

    def interleaved(variants: dict, reps: int) -> dict:
        """Median (seconds, maps, bytes) of each variant, the variants taking turns (fair under
        load from other processes)."""
        for f in variants.values():
            f()
        runs: dict[str, list] = {k: [] for k in variants}
        for _ in range(reps):
            for k, f in variants.items():
                runs[k].append(f())
        return {k: sorted(v)[len(v) // 2] for k, v in runs.items()}

    def table(med: dict) -> None:
        base = med[next(iter(med))]
        base_rate = base[1] / base[0]
        for k, (sec, maps, nbytes) in med.items():
            print(f"| {k} | {sec:.3f} | {maps / sec:,.0f} | {nbytes / 1e6 / sec:.0f} | {maps / sec / base_rate:.2f} |")

    # one-core tasks: 1, 2, 4, ... up to this machine's CPUs (the scaling with workers)
    task_counts = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= (os.cpu_count() or 1)]
    t0 = time.perf_counter()
    job(True, num_workers=task_counts[-1], threads=1)()  # warm-up: worker processes start and import the package
    print(f"first job incl. worker start-up {time.perf_counter() - t0:.1f} s")
    # Ray keeps idle workers per resource shape: alternating 1-CPU and 2-CPU tasks would start a
    # worker process (~4 s) almost every turn, which no real job does. So the 2-thread Ray task
    # (2 CPUs) takes turns only with the single reader, in its own set.
    single_name = "single reader (plain zarr, shard by shard, no compute)"
    for read_maps in (True, False):
        tag = "maps + spectra" if read_maps else "spectra only"
        print(f"\n## {tag} (median of {reps}, variants interleaved)\n"
              "| reader | read s | maps/s | MB/s | vs single reader |\n|---|---|---|---|---|")
        med = interleaved({
            single_name: single(read_maps),
            "job, in process (`num_workers=0`, 2 threads)": job(read_maps, num_workers=0),
            "job, in process, reads through zarr instead of `ShardReader`": in_process_zarr_reads(read_maps),
            **{f"job on Ray, {k} reader task{'s' if k > 1 else ''}, `threads=1` (one core{' each' if k > 1 else ''})":
               job(read_maps, num_workers=k, threads=1) for k in task_counts},
        }, reps)
        table(med)
        med2 = interleaved({
            single_name + " (second set)": single(read_maps),
            "job on Ray, 1 reader task (default: 2 threads, 2 CPUs)": job(read_maps, num_workers=1),
        }, reps)
        table(med2)
        scaled = [v for k, v in med.items() if "`threads=1`" in k]
        print("scaling, one core per task (time of 1 task / time of k tasks): " + ", ".join(
            f"{k}: {scaled[0][0] / v[0]:.2f}x" for k, v in zip(task_counts, scaled)))
    t0 = time.perf_counter()
    full = agg.run_aggregation(store, out_dir=out)
    print(f"\nfull job with tables + plots (default workers and threads): {time.perf_counter() - t0:.2f} s "
          f"(read {full['read_seconds']:.2f} s, write {full['write_seconds']:.2f} s)")
    ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["spectral", "aggregate", "all"], default="all")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--classes", type=int, default=10, help="classes of the synthetic store (per-class statistics)")
    args = p.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  cpus={os.cpu_count()}  torch {torch.__version__}")
    if args.part in ("spectral", "all"):
        bench_spectral()
    if args.part in ("aggregate", "all"):
        with tempfile.TemporaryDirectory() as d:
            bench_aggregate(args.images, args.size, args.reps, d, args.classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
