"""Ray job entrypoint for the aggregation job.

    ray job submit --working-dir . -- python jobs/aggregate.py STORE [--out DIR] [--workers N]

Joins the cluster the job was submitted to (``ray job submit`` sets RAY_ADDRESS) and runs
``distributed_attr.aggregate.run_aggregation``: reader tasks open the store themselves, so its
path must be reachable from every node (a shared file system). Prints the summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_attr.aggregate import run_aggregation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dataset-wide spectra and filter statistics over a store")
    parser.add_argument("store", help="path of the Zarr store written by the attribution job")
    parser.add_argument("--out", default=None, help="folder for Parquet tables and PNG plots "
                        "(default: <store parent>/<store stem>-outputs)")
    parser.add_argument("--workers", type=int, default=None,
                        help="reader tasks in flight (default: the cluster's CPUs / --threads; 0: no Ray)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads (and Ray CPUs) per reader task (default 2: read ahead while reducing)")
    parser.add_argument("--no-maps", action="store_true",
                        help="skip the mean/std maps: read only the small spectral arrays")
    parser.add_argument("--address", default=None, help="Ray address (default: auto when RAY_ADDRESS is set)")
    args = parser.parse_args(argv)
    address = args.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    result = run_aggregation(args.store, address=address, num_workers=args.workers, out_dir=args.out,
                             threads=args.threads, read_maps=not args.no_maps)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
