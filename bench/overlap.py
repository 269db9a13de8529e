"""Overlap inside a worker: the job's images/s against its two stages measured alone, in one run.

    python bench/overlap.py [--images 256] [--size 1600]

The setting the overlap is for: decoding and compute each take a comparable time per image. Large
JPEGs (photos that ship with scikit-image, cropped and enlarged to ``--size`` px, quality 90) are
decoded and resized to 96 px; a small CNN computes Saliency and SmoothGrad, whose sample count is
calibrated in this run so that compute takes about as long as decoding. One thread decodes, one
torch thread computes (each stage alone uses one of this machine's two cores, as a GPU actor's
compute uses the GPU and its decoding the CPUs).

Printed, all from this run: decode alone (read + decode every image, one thread), compute alone
(the same processor's compute on the decoded images held in memory), the job sequential
(``run.decode_workers: 0``: read, decode, compute, write one after another: about the sum) and the
job overlapped (``decode_workers: 1, prefetch_units: 1``). Target: overlapped >= 0.85 x the slower
stage alone.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from distributed_attr.config import Config  # noqa: E402
from distributed_attr.runner import prepare_store, run  # noqa: E402


def photos(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of ``size`` x 3/4 ``size`` px: random crops of scikit-image's sample photos,
    enlarged (so that decoding costs what a camera's JPEG costs)."""
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * 0.7), int(w * 0.7)
        top, left = rng.integers(0, h - ch), rng.integers(0, w - cw)
        im = Image.fromarray(src[top:top + ch, left:left + cw]).resize((size, size * 3 // 4), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def config(data: Path, store: Path, samples: int, **run_over) -> dict:
    return {
        "data": {"format": "parquet", "path": str(data), "image_size": 96, "channels": 3},
        "store": str(store),
        "model": {"kind": "callable", "name": "bench_models:small_rgb_cnn"},
        "methods": {"saliency": {}, "smoothgrad": {"samples": samples}},
        "spectra": {"enabled": True},
        "run": {"num_workers": 0, "unit_size": 32, "batch_size": 16, "cpus_per_worker": 1, **run_over},
    }


def stages_alone(data: Path, store: Path, samples: int) -> tuple[float, float]:
    """(decode images/s, compute images/s), each stage alone on one thread, same processor code."""
    cfg = Config.from_dict(config(data, store, samples, decode_workers=0))
    _, proc, lease = prepare_store(cfg, resume=False, overwrite=True)
    lease.release()
    from distributed_attr.io.sources import decode_sample

    units = range(-(-proc.n_images() // cfg.run.unit_size))
    t = time.perf_counter()
    loaded = []
    for u in units:
        lu = proc._read(u, inline=True)
        lu.items = [(i, lab, name, _done(decode_sample(*sample, cfg.data))) for i, lab, name, sample in lu.items]
        loaded.append(lu)
    decode = proc.n_images() / (time.perf_counter() - t)
    proc._compute(loaded[0])  # warm-up
    t = time.perf_counter()
    for lu in loaded:
        proc._compute(lu)  # items are tensors: nothing left to decode
    compute = proc.n_images() / (time.perf_counter() - t)
    return decode, compute


def _done(value):
    """A finished future holding ``value``: compute then finds every image decoded."""
    from concurrent.futures import Future

    f = Future()
    f.set_result(value)
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=1600, help="JPEG width in px")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=1, help="run.prefetch_units of the overlapped job")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        payloads = photos(args.images, args.size)
        for k in range(4):
            part = payloads[k::4]
            pq.write_table(pa.table({"image": [{"bytes": b, "path": f"{k}-{i}.jpg"} for i, b in enumerate(part)],
                                     "label": [0] * len(part)}), tmp / "data" / f"part-{k}.parquet")
        # calibrate SmoothGrad's samples so that compute takes about as long as decoding
        decode, compute = stages_alone(tmp / "data", tmp / "cal.zarr", samples=8)
        per_sample = (1 / compute) / 9  # saliency + 8 samples: about 9 passes per image
        samples = int(np.clip(round((1 / decode) / per_sample) - 1, 1, 256))
        rows = []
        for r in range(args.repeats):
            decode, compute = stages_alone(tmp / "data", tmp / "alone.zarr", samples)
            seq = run(config(tmp / "data", tmp / "seq.zarr", samples, decode_workers=0), overwrite=True,
                      progress=False).images_per_second
            ovl = run(config(tmp / "data", tmp / "ovl.zarr", samples, decode_workers=1, prefetch_units=args.prefetch),
                      overwrite=True, progress=False).images_per_second
            rows.append((decode, compute, seq, ovl))
    decode, compute, seq, ovl = (max(col) for col in zip(*rows))  # best of the repeats, each column
    slower = min(decode, compute)
    print(f"{args.images} JPEGs of {args.size}x{args.size * 3 // 4} px -> 96 px; saliency + smoothgrad "
          f"(samples={samples}); torch {torch.__version__}, {os.cpu_count()} cores; best of {args.repeats}")
    print("| stage | images/s | / slower stage alone |")
    print("|---|---:|---:|")
    for name, v in [("decode alone (1 thread)", decode), ("compute alone (1 torch thread)", compute),
                    ("job, sequential (decode_workers: 0)", seq), (f"job, overlapped (decode_workers: 1, prefetch_units: {args.prefetch})", ovl)]:
        print(f"| {name} | {v:.1f} | {v / slower:.2f} |")
    print(f"sum of the stages (no overlap) would give {1 / (1 / decode + 1 / compute):.1f} images/s; "
          f"target: overlapped >= 0.85 x slower stage -> {'met' if ovl >= 0.85 * slower else 'NOT met'}")


if __name__ == "__main__":
    main()
