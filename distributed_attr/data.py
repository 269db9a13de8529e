"""Real bundled data written in the formats the sources read (for the demo, tests, benchmarks).

The images are scikit-learn's handwritten digits (real scans, shipped inside the package), upsampled
to ``size`` pixels and encoded as PNG, exactly as a user's own dataset would arrive.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def digits_uint8(size: int = 32, n: int | None = None, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Digits as uint8 images (N, size, size) and labels, from the zoo's fixed split."""
    from .zoo import digits_dataset, split_indices

    x, y = digits_dataset(size)
    train_idx, test_idx = split_indices(len(x))
    idx = {"test": test_idx, "train": train_idx, "all": np.arange(len(x))}[split]
    if n is not None:
        idx = idx[:n]
    return (x[idx, 0] * 255).round().astype(np.uint8), y[idx]


def write_parquet_shards(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, shards: int = 4,
                         row_group_size: int = 64) -> list[Path]:
    """Hugging Face ``datasets`` layout: ``image`` struct {bytes, path} and ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, idx in enumerate(np.array_split(np.arange(len(images)), shards)):
        table = pa.table({
            "image": [{"bytes": _png(images[i]), "path": f"{i:06d}.png"} for i in idx],
            "label": pa.array(labels[idx].astype(np.int64)),
        })
        path = out / f"train-{s:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_image_folder(out_dir: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    out = Path(out_dir)
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = out / f"class_{int(lab)}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.png").write_bytes(_png(img))
    return out


def write_webdataset(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, shards: int = 2) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, idx in enumerate(np.array_split(np.arange(len(images)), shards)):
        path = out / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in idx:
                for ext, payload in (("png", _png(images[i])), ("cls", str(int(labels[i])).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths
