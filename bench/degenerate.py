"""What counting degenerate maps costs the job, in one run: a unit's compute and write with the
flags against the same unit without them.

    python bench/degenerate.py [--repeats 24] [--spectra]

The cheapest job there is, so that the flags weigh most: Saliency and Grad-CAM (one shared
forward+backward) of the zoo's digits CNN on 256 digits at 32 px (one unit), batches of 64, one
torch thread, no spectra unless ``--spectra``. Per repeat, interleaved: the unit's batches through
``UnitProcessor.compute_batch`` (which computes every method's flags), the same
``degenerate_flags`` calls alone on the same maps, and the unit's arrays written with and without
the ``degenerate/<method>`` arrays (alternating which goes first). CPU seconds (``process_time``),
medians, so that other work on a shared machine counts less.

Throughput with / without = (compute - flags + write without) / (compute + write with). Target:
>= 0.97. The end-of-job count (one read of ``degenerate/<method>``, one byte per image) and the
start-up choices (one forward pass per method that chooses) fall outside the throughput.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distributed_attr.config import Config  # noqa: E402
from distributed_attr.data import digits_uint8, write_parquet_shards  # noqa: E402
from distributed_attr.io.sources import decode_image, open_source  # noqa: E402
from distributed_attr.io.store import Keys, UnitWriter  # noqa: E402
from distributed_attr.methods.degenerate import degenerate_flags  # noqa: E402
from distributed_attr.runner import prepare_store  # noqa: E402

METHODS = {"saliency": {}, "gradcam": {}}
UNIT, BATCH = 256, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=24)
    ap.add_argument("--spectra", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-degenerate-"))
    write_parquet_shards(tmp / "data", *digits_uint8(32, n=UNIT), shards=1, row_group_size=128)
    store = str(tmp / "s.zarr")
    cfg = Config.from_dict({
        "data": {"format": "parquet", "path": str(tmp / "data"), "image_size": 32, "channels": 1,
                 "mean": [0.0], "std": [1.0]},
        "store": store, "model": {"kind": "zoo", "name": "digits_cnn"}, "methods": METHODS,
        "spectra": {"enabled": args.spectra},
        "run": {"num_workers": 0, "unit_size": UNIT, "batch_size": BATCH, "decode_workers": 0}})
    _, proc, lease = prepare_store(cfg, resume=False, overwrite=False)
    try:
        src = open_source(cfg.data)
        x = torch.stack([decode_image(r.payload, cfg.data) for r in src.read(0, UNIT)])
        labels = torch.zeros(UNIT, dtype=torch.int64)
        writer = UnitWriter(store)
        compute, flags, with_flags, without = [], [], [], []
        for rep in range(args.repeats):
            t = time.process_time()
            outs = [proc.compute_batch(x[i:i + BATCH], labels[i:i + BATCH], torch.arange(i, i + BATCH))
                    for i in range(0, UNIT, BATCH)]
            compute.append(time.process_time() - t)
            arrays = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
            maps = {m: torch.from_numpy(arrays[Keys.maps(m)]).float() for m in METHODS}
            t = time.process_time()
            for m in METHODS:
                for i in range(0, UNIT, BATCH):
                    degenerate_flags(maps[m][i:i + BATCH]).cpu().numpy()
            flags.append(time.process_time() - t)
            arrays.update({Keys.IMAGE: np.arange(UNIT), Keys.LABEL: labels.numpy(), Keys.OK: np.ones(UNIT, bool),
                           Keys.SOURCE_KEY: np.asarray([f"k{i}" for i in range(UNIT)])})
            plain = {k: v for k, v in arrays.items() if not k.startswith(Keys.DEGENERATE + "/")}
            order = [(arrays, with_flags), (plain, without)]
            for arrs, acc in (order if rep % 2 else order[::-1]):
                t = time.process_time()
                writer.write(0, arrs)
                acc.append(time.process_time() - t)
    finally:
        lease.release()
    med = statistics.median
    c, f, w, wo = med(compute), med(flags), med(with_flags), med(without)
    print(f"methods: {', '.join(METHODS)}; {UNIT} digits at 32 px in one unit; batch {BATCH}; 1 thread; "
          f"spectra {'on' if args.spectra else 'off'}; medians of {args.repeats}, CPU seconds per unit")
    print(f"compute (flags included)      {c:.4f} s")
    print(f"  of which the flags          {f:.5f} s ({100 * f / c:.2f}%)")
    print(f"write with the flag arrays    {w:.4f} s")
    print(f"write without                 {wo:.4f} s")
    print(f"throughput with / without     {(c - f + wo) / (c + w):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
