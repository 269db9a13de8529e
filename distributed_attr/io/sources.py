"""Image sources: Parquet shards, image folders, WebDataset tars and NumPy arrays.

A source gives every image a stable global index (its position in a deterministic order of
files and rows) and reads any index range by touching only the files that hold it, so a worker
streams its own unit and nothing holds the dataset in memory. Only the driver lists files and
counts rows (from Parquet footers and tar headers, never image data).

``read(start, stop)`` yields ``Record``s whose ``payload`` is still encoded (bytes) or a raw array;
decoding happens in ``decode_image`` so that a corrupt image fails alone, with its reason.
"""
from __future__ import annotations

import bisect
import glob
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class SourceError(ValueError):
    """The dataset cannot be read as configured (missing files, wrong columns, ...)."""


@dataclass
class Record:
    index: int
    payload: Any  # encoded bytes, or a numpy array (H, W), (H, W, C) or (C, H, W)
    label: int = -1
    name: str = ""


def _expand(path: str, suffixes: tuple[str, ...]) -> list[str]:
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in suffixes
        )
    elif os.path.exists(path):
        files = [path]
    else:
        raise SourceError(f"data.path {path!r} does not exist")
    files = [f for f in files if f.lower().endswith(suffixes)]
    if not files:
        raise SourceError(f"data.path {path!r} holds no {'/'.join(suffixes)} files")
    return files


class Source:
    """Base class: ``len`` images, readable by index range."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> Iterator[Record]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"format": type(self).__name__, "images": len(self)}


class _OffsetSource(Source):
    """A source made of files with known item counts; global index = running offset."""

    files: list[str]
    counts: list[int]

    def _setup_offsets(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _files_for(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(file number, first row in file, stop row in file) for the global range."""
        f = bisect.bisect_right(self.offsets, start) - 1
        while f < len(self.files) and self.offsets[f] < stop:
            lo = max(start, self.offsets[f]) - self.offsets[f]
            hi = min(stop, self.offsets[f + 1]) - self.offsets[f]
            if hi > lo:
                yield f, lo, hi
            f += 1

    def describe(self) -> dict[str, Any]:
        return {"format": type(self).__name__, "images": len(self), "files": len(self.files)}


class ParquetSource(_OffsetSource):
    """Parquet shards in the Hugging Face ``datasets`` layout: an image column holding a struct
    ``{bytes, path}`` (or raw bytes) and an integer label column (optional)."""

    def __init__(self, cfg: DataConfig):
        import pyarrow.parquet as pq

        self.cfg = cfg
        self.files = _expand(cfg.path, (".parquet",))
        self.counts = []
        for f in self.files:
            try:
                meta = pq.ParquetFile(f)
            except Exception as exc:  # a corrupt footer: say which file
                raise SourceError(f"cannot read Parquet file {f!r}: {exc}") from None
            names = meta.schema_arrow.names
            if cfg.image_column not in names:
                raise SourceError(
                    f"data.image_column {cfg.image_column!r} is not a column of {f!r}; columns: {names}"
                )
            self.counts.append(meta.metadata.num_rows)
        self.has_label = cfg.label_column in pq.ParquetFile(self.files[0]).schema_arrow.names
        self._setup_offsets()

    def read(self, start: int, stop: int) -> Iterator[Record]:
        import pyarrow.parquet as pq

        columns = [self.cfg.image_column] + ([self.cfg.label_column] if self.has_label else [])
        for f, lo, hi in self._files_for(start, stop):
            pf = pq.ParquetFile(self.files[f])
            # Read only the row groups that overlap [lo, hi).
            groups, first_row, row = [], None, 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row + n > lo and row < hi:
                    groups.append(g)
                    first_row = row if first_row is None else first_row
                row += n
            table = pf.read_row_groups(groups, columns=columns).slice(lo - first_row, hi - lo)
            images = table.column(self.cfg.image_column).to_pylist()
            labels = table.column(self.cfg.label_column).to_pylist() if self.has_label else [-1] * len(images)
            base = self.offsets[f] + lo
            for i, (img, label) in enumerate(zip(images, labels)):
                name = ""
                if isinstance(img, dict):
                    name = img.get("path") or ""
                    img = img.get("bytes")
                yield Record(base + i, img, -1 if label is None else int(label), name)


class FolderSource(_OffsetSource):
    """An image folder: one subfolder per class (labels = sorted subfolder order), or a flat folder
    (labels -1). Files sorted by path."""

    def __init__(self, cfg: DataConfig):
        root = Path(cfg.path)
        if not root.is_dir():
            raise SourceError(f"data.path {cfg.path!r} is not a directory")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if self.classes:
            groups = [sorted(str(p) for p in (root / c).rglob("*")
                             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) for c in self.classes]
        else:
            groups = [sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)]
        self.paths = [p for g in groups for p in g]
        self.labels = [i if self.classes else -1 for i, g in enumerate(groups) for _ in g]
        if not self.paths:
            raise SourceError(f"data.path {cfg.path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.files, self.counts = self.paths, [1] * len(self.paths)
        self._setup_offsets()

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> Iterator[Record]:
        for i in range(start, min(stop, len(self.paths))):
            try:
                payload: Any = Path(self.paths[i]).read_bytes()
            except OSError as exc:
                payload = exc
            yield Record(i, payload, self.labels[i], self.paths[i])


def _wds_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class WebDatasetSource(_OffsetSource):
    """WebDataset ``.tar`` shards: files grouped into samples by key; the image is the first
    member with an image extension, the label a ``cls``/``label``/``cls.txt`` member."""

    def __init__(self, cfg: DataConfig):
        self.files = _expand(cfg.path, (".tar",))
        self.keys: list[list[str]] = []
        for f in self.files:
            try:
                with tarfile.open(f) as tar:
                    keys = list(dict.fromkeys(_wds_key(m.name)[0] for m in tar.getmembers() if m.isfile()))
            except (tarfile.TarError, OSError) as exc:
                raise SourceError(f"cannot read tar shard {f!r}: {exc}") from None
            self.keys.append(keys)
        self.counts = [len(k) for k in self.keys]
        self._setup_offsets()

    def read(self, start: int, stop: int) -> Iterator[Record]:
        for f, lo, hi in self._files_for(start, stop):
            wanted = set(self.keys[f][lo:hi])
            samples: dict[str, dict[str, bytes]] = {}
            with tarfile.open(self.files[f]) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _wds_key(m.name)
                    if key in wanted:
                        fh = tar.extractfile(m)
                        samples.setdefault(key, {})[ext] = fh.read() if fh else b""
            for i, key in enumerate(self.keys[f][lo:hi]):
                parts = samples.get(key, {})
                image = next((v for e, v in parts.items() if "." + e.split(".")[-1] in IMAGE_EXTENSIONS), None)
                label = -1
                for lk in ("cls", "label", "cls.txt", "label.txt"):
                    if lk in parts:
                        try:
                            label = int(parts[lk].decode().strip())
                        except ValueError:
                            pass
                        break
                payload: Any = image if image is not None else SourceError(f"sample {key!r} has no image member")
                yield Record(self.offsets[f] + lo + i, payload, label, f"{self.files[f]}:{key}")


class NumpySource(Source):
    """A ``.npy`` array of images (N, H, W), (N, H, W, C) or (N, C, H, W); uint8 (0..255) or float
    (0..1). Memory-mapped: a worker reads only its rows."""

    def __init__(self, cfg: DataConfig):
        if not os.path.exists(cfg.path):
            raise SourceError(f"data.path {cfg.path!r} does not exist")
        self.array = np.load(cfg.path, mmap_mode="r")
        if self.array.ndim not in (3, 4):
            raise SourceError(f"{cfg.path!r}: expected images (N,H,W[,C]) or (N,C,H,W), got shape {self.array.shape}")
        self.labels = None
        if cfg.labels_path:
            self.labels = np.load(cfg.labels_path, mmap_mode="r")
            if len(self.labels) != len(self.array):
                raise SourceError(f"data.labels_path has {len(self.labels)} labels for {len(self.array)} images")

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, stop: int) -> Iterator[Record]:
        block = np.asarray(self.array[start:stop])
        labels = np.asarray(self.labels[start:stop]) if self.labels is not None else None
        for i in range(len(block)):
            yield Record(start + i, block[i], int(labels[i]) if labels is not None else -1)


SOURCES = {"parquet": ParquetSource, "folder": FolderSource, "webdataset": WebDatasetSource, "numpy": NumpySource}


def open_source(cfg: DataConfig) -> Source:
    return SOURCES[cfg.format](cfg)


# ------------------------------------------------------------------------------------------------
# Decoding and preprocessing
# ------------------------------------------------------------------------------------------------


def _to_float_chw(payload: Any, channels: int) -> torch.Tensor:
    """Decode a payload into float32 (C, H, W) in [0, 1] with ``channels`` channels."""
    if isinstance(payload, BaseException):
        raise payload
    if payload is None:
        raise ValueError("empty image payload")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(payload))) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
        t = torch.from_numpy(arr.copy()).float().div_(255.0)
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        arr = np.asarray(payload)
        if arr.dtype == np.uint8:
            t = torch.from_numpy(arr.astype(np.float32) / 255.0)
        else:
            t = torch.from_numpy(arr.astype(np.float32))
        if t.ndim == 2:
            t = t.unsqueeze(0)
        elif t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
        if t.shape[0] == 4:
            t = t[:3]
    if not torch.isfinite(t).all():
        raise ValueError("image holds NaN or infinite values")
    if t.shape[0] != channels:
        if channels == 1:
            t = t.mean(0, keepdim=True)
        elif t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        else:
            raise ValueError(f"cannot convert {t.shape[0]} channels to {channels}")
    return t.contiguous()


def decode_image(payload: Any, cfg: DataConfig) -> torch.Tensor:
    """Payload -> normalised float32 (C, S, S): resize the shorter side to S (bilinear, antialiased),
    centre-crop, subtract ``mean`` and divide by ``std``. Raises on a corrupt image."""
    t = _to_float_chw(payload, cfg.channels)
    size = cfg.image_size
    _, h, w = t.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            t = F.interpolate(t.unsqueeze(0), size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True).squeeze(0)
        top, left = (nh - size) // 2, (nw - size) // 2
        t = t[:, top:top + size, left:left + size]
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
    return ((t - mean) / std).contiguous()
