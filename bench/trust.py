"""What the trust checks cost, measured in one run on the same machine.

    python3 bench/trust.py [--images 768] [--repeats 3] [--verify-images 10240] [--size 64] [--verify-only]

1. The attribution job's per-unit work (a worker's ``UnitProcessor.process_units`` over the
   bundled digits, read -> decode -> maps -> spectra -> write) with the per-image degenerate-map
   flags and the per-unit shard checksums, against the same work with both replaced by no-ops and
   the flag arrays not written.
   The two conditions alternate, best of ``--repeats`` each; the ratio checked / unchecked is the
   throughput the checks leave (target: >= 0.97). One worker, no Ray: the checks run inside the
   worker, so the Ray job pays them the same way per image (bench/pipeline.py measures the job).
2. ``inspect --verify`` (``AttributionStore.verify``: every done unit's shards listed, read back,
   their ``image`` range and their recorded checksums compared) on a synthetic store of
   ``--verify-images`` images (2 methods, maps, spectra, hf fractions), in seconds per 10,000
   images, with and without the checksum comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distributed_attr import pipeline  # noqa: E402
from distributed_attr.io import store as store_module  # noqa: E402

METHODS = {"saliency": {}, "gradient_x_input": {}, "integrated_gradients": {"steps": 16},
           "smoothgrad": {"samples": 16}}


@contextmanager
def checks_off(writer=None):
    """The degenerate flags (a zero array of the same shape) and the checksums (0) as no-ops; with
    a worker's ``writer``, its ``degenerate/<method>`` arrays are not written either (as a store
    without them: what the job was before the checks)."""
    flags, checksum = pipeline.degenerate_flags, store_module.block_checksum
    pipeline.degenerate_flags = lambda m: torch.zeros(m.shape[0], dtype=torch.uint8, device=m.device)
    store_module.block_checksum = lambda block: 0
    absent = set(writer.absent) if writer is not None else None
    if writer is not None:
        writer.absent |= {store_module.Keys.degenerate(m) for m in writer.group.attrs.get("methods", [])}
    try:
        yield
    finally:
        pipeline.degenerate_flags, store_module.block_checksum = flags, checksum
        if writer is not None:
            writer.absent = absent


def unit_work(tmp: Path, n_images: int, repeats: int) -> tuple[float, float]:
    from distributed_attr.config import Config
    from distributed_attr.data import digits_uint8, write_parquet_shards
    from distributed_attr.runner import prepare_store

    imgs, labels = digits_uint8(32, n=n_images, split="all")
    write_parquet_shards(tmp / "pq", imgs, labels, shards=4)
    cfg = Config.from_dict({
        "data": {"format": "parquet", "path": str(tmp / "pq"), "image_size": 32, "channels": 1,
                 "mean": [0.0], "std": [1.0]},
        "store": str(tmp / "s.zarr"), "model": {"kind": "zoo", "name": "digits_cnn"}, "methods": METHODS,
        "run": {"num_workers": 0, "unit_size": 64, "batch_size": 32, "decode_workers": 0},
    })
    store, proc, lease = prepare_store(cfg, resume=False, overwrite=True)
    units = list(range(store.n_units))
    try:
        list(proc.process_units(units[:1]))  # warm-up: the model, the first batch's allocations
        best = {True: 0.0, False: 0.0}
        for _ in range(repeats):
            for checked in (True, False):
                t = time.perf_counter()
                if checked:
                    results = list(proc.process_units(units))
                else:
                    with checks_off(proc._writer):
                        results = list(proc.process_units(units))
                rate = sum(r.images for r in results) / (time.perf_counter() - t)
                best[checked] = max(best[checked], rate)
                print(f"  {'checked  ' if checked else 'unchecked'} {rate:7.1f} images/s", flush=True)
    finally:
        lease.release()
    return best[True], best[False]


def verify_seconds(tmp: Path, n_images: int, size: int, repeats: int) -> tuple[float, float]:
    from distributed_attr.aggregate.synthetic import write_synthetic_store
    from distributed_attr.io.store import AttributionStore

    path = write_synthetic_store(tmp / "v.zarr", n_images=n_images, unit_size=256, height=size, seed=1)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for checked in (True, False):
            store = AttributionStore.open(path, "r")
            t = time.perf_counter()
            if checked:
                bad = store.verify(decode=True)
                assert not bad, bad
            else:
                with checks_off():  # every comparison then fails: only the time is kept
                    store.verify(decode=True)
            best[checked] = min(best[checked], time.perf_counter() - t)
    return best[True], best[False]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verify-images", type=int, default=10240)
    ap.add_argument("--size", type=int, default=64, help="map side of the synthetic store verified")
    ap.add_argument("--verify-only", action="store_true", help="only part 2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not args.verify_only:
            print(f"1. a worker's units: {args.images} digits (32 px), 64 per unit, {len(METHODS)} methods, spectra")
            checked, unchecked = unit_work(tmp, args.images, args.repeats)
            print(f"   best: checked {checked:.1f} images/s, unchecked {unchecked:.1f} images/s, "
                  f"ratio {checked / unchecked:.3f} (target >= 0.97)")
        print(f"2. inspect --verify on {args.verify_images} images ({args.size}x{args.size} maps, 2 methods, spectra)")
        with_sums, without = verify_seconds(tmp, args.verify_images, args.size, args.repeats)
        per = 10_000 / args.verify_images
        print(f"   {with_sums * per:.2f} s per 10,000 images with the checksum comparison, "
              f"{without * per:.2f} s without (ratio {without / with_sums:.3f})")

if __name__ == "__main__":
    main()
