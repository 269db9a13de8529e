"""Object storage against local disk, and what one driver can feed, measured in one run.

    python3 bench/cluster.py [--images 384] [--workers 2] [--units 10000]

1. **S3 against local disk.** The same job (Parquet shards -> Ray actors -> Zarr store, saliency +
   integrated gradients, 32 px digits) twice in alternation: data and store on local disk, then
   data and store on an S3-compatible server (moto, on 127.0.0.1 in this process). Best of
   ``--repeats`` each; the ratio S3 / local is what object storage costs the job (target >= 0.8).
   A loopback server has no network latency but does run every request through HTTP, signing
   and XML on the same two cores as the job.
2. **The driver's cost per unit.** A job of ``--units`` one-image units with a model that does
   next to nothing (a 1x1 input and one linear layer), so the actors return at once and the
   driver is the busy part: the driver's own time in dispatch + commit (``driver_seconds``)
   divided by the units is its cost per unit, and its inverse the units/s one driver can feed.
   At ImageNet scale (1.28 M images, unit_size 256 = 5,000 units) with GPU actors attributing
   ``--gpu-rate`` images/s each, 256 actors ask for 256 * rate / 256 units/s: the driver keeps
   up while that stays below its units/s.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_attr.data import digits_uint8, write_parquet_shards  # noqa: E402
from distributed_attr.ray_session import ray_session  # noqa: E402
from distributed_attr.runner import run  # noqa: E402

BUCKET = "bench"


def job(data: str, store: str, workers: int, unit_size: int = 32) -> dict:
    return {
        "data": {"format": "parquet", "path": data, "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": store,
        "model": {"kind": "zoo", "name": "digits_cnn"},
        "methods": {"saliency": {}, "integrated_gradients": {"steps": 8}},
        "spectra": {"enabled": True},
        "run": {"num_workers": workers, "unit_size": unit_size, "batch_size": 32},
    }


def start_s3() -> object:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
                      AWS_ALLOW_HTTP="true")
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def s3_vs_local(tmp: Path, images: int, workers: int, repeats: int) -> None:
    import boto3

    data = tmp / "data"
    write_parquet_shards(data, *digits_uint8(32, n=images), shards=4, row_group_size=32)
    client = boto3.client("s3")
    for f in sorted(data.glob("*.parquet")):
        client.upload_file(str(f), BUCKET, f"data/{f.name}")
    best = {"local": 0.0, "s3": 0.0}
    with ray_session(None, num_cpus=workers):
        for r in range(repeats):
            for where in ("local", "s3"):
                if where == "local":
                    cfg = job(str(data / "*.parquet"), str(tmp / f"local-{r}.zarr"), workers)
                else:
                    cfg = job(f"s3://{BUCKET}/data/*.parquet", f"s3://{BUCKET}/runs/{r}.zarr", workers)
                cpu0 = time.process_time()
                s = run(cfg, progress=False)
                # this process's CPU: the driver, plus (S3) the moto server's threads, which a real
                # object store would not take from the job's two cores
                cpu = time.process_time() - cpu0
                best[where] = max(best[where], s.images_per_second)
                print(f"  {where:5s} run {r}: {s.images_per_second:7.1f} images/s ({s.seconds:.1f} s); "
                      f"driver{' + S3 server' if where == 's3' else ''} CPU {cpu:.1f} s")
    print(f"S3 / local (best of {repeats}): {best['s3']:.1f} / {best['local']:.1f} images/s "
          f"= {best['s3'] / best['local']:.2f} (target >= 0.8)")


def driver_cost(tmp: Path, units: int, workers: int, gpu_rate: float) -> None:
    import numpy as np

    n = units
    np.save(tmp / "tiny.npy", np.zeros((n, 8, 8), dtype=np.uint8))
    cfg = {
        "data": {"format": "numpy", "path": str(tmp / "tiny.npy"), "image_size": 8, "channels": 1,
                 "mean": [0.0], "std": [1.0]},
        "store": str(tmp / "driver.zarr"),
        "model": {"kind": "callable", "name": "bench_models:tiny_linear"},
        "methods": {"saliency": {}},
        "spectra": {"enabled": False},
        "run": {"num_workers": workers, "unit_size": 1, "batch_size": 1, "units_in_flight": 4},
    }
    # actors import the model by name: this folder on their path (set before Ray starts)
    here = str(Path(__file__).resolve().parent)
    sys.path.insert(0, here)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    with ray_session(None, num_cpus=workers):
        s = run(cfg, progress=False)
    per_unit = max(s.driver_seconds, s.driver_cpu_seconds) / units
    capacity = 1 / per_unit
    demand = 256 * gpu_rate / 256  # 256 actors, unit_size 256
    print(f"driver: {units} units in {s.seconds:.1f} s wall ({s.images_per_second:.0f} units/s, actor-bound here); "
          f"dispatch + commit {s.driver_seconds:.2f} s, driver process CPU {s.driver_cpu_seconds:.2f} s "
          f"= {per_unit * 1e3:.3f} ms per unit (the larger of the two)")
    print(f"one driver feeds up to {capacity:.0f} units/s; 256 GPU actors at {gpu_rate:.0f} images/s with "
          f"unit_size 256 ask for {demand:.0f} units/s: {'the driver keeps up' if capacity > demand else 'the DRIVER IS THE BOTTLENECK'} "
          f"({capacity / demand:.1f}x headroom)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--gpu-rate", type=float, default=2000.0,
                    help="images/s one GPU actor attributes (Saliency, ResNet-50, H100-class; see docs)")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-driver", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = None if args.skip_s3 else start_s3()
        try:
            if server is not None:
                s3_vs_local(tmp, args.images, args.workers, args.repeats)
            if not args.skip_driver:
                driver_cost(tmp, args.units, args.workers, args.gpu_rate)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
