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
import functools
import glob
import io
import math
import os
import posixpath
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..registry import Registry
from .storage import describe_error, filesystem, is_remote, local_path, scheme

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class SourceError(ValueError):
    """The dataset cannot be read as configured (missing files, wrong columns, ...)."""


@dataclass
class Record:
    index: int
    payload: Any  # encoded bytes, or a numpy array (H, W), (H, W, C) or (C, H, W)
    label: int = -1
    name: str = ""
    #: where the image came from, stable across machines: "<file>:<row>" (Parquet), the path
    #: relative to data.path (folder), "<tar>:<key>" (WebDataset), "<row>" (NumPy)
    key: str = ""
    #: the ground-truth mask's payload (``data.mask_column``), or None
    mask: Any = None


class Files:
    """Where a source's files live: the local file system, or object storage (``s3://``, ``gs://``,
    ``az://``) through obstore's fsspec adapter. Locations are plain paths locally and full URLs
    remotely, so that messages, listings and source keys name them as the user wrote them."""

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None):
        self.remote = is_remote(location)
        self.scheme = scheme(location)
        self.fs = filesystem(location, storage_options)[0] if self.remote else None

    def _p(self, loc: str) -> str:
        return str(loc).partition("://")[2] if self.remote else local_path(str(loc))

    def _url(self, p: str) -> str:
        return f"{self.scheme}://{p}" if self.remote else p

    def _call(self, what: str, loc: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:  # credentials, a missing bucket, the network: say which location
            raise SourceError(f"{what}: {describe_error(exc, str(loc))}") from None

    def isdir(self, loc: str) -> bool:
        if not self.remote:
            return os.path.isdir(self._p(loc))
        return self._call("data.path", loc, self.fs.isdir, self._p(loc))

    def exists(self, loc: str) -> bool:
        if not self.remote:
            return os.path.exists(self._p(loc))
        return self._call("data.path", loc, self.fs.exists, self._p(loc))

    def glob(self, pattern: str) -> list[str]:
        if not self.remote:
            return sorted(glob.glob(self._p(pattern), recursive=True))
        return sorted(self._url(p) for p in self._call("data.path", pattern, self.fs.glob, self._p(pattern)))

    def find(self, loc: str, suffixes: tuple[str, ...]) -> list[str]:
        """Files below ``loc`` (recursive) whose names end with ``suffixes``, sorted."""
        if not self.remote:
            return sorted(str(p) for p in Path(self._p(loc)).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        found = self._call("data.path", loc, self.fs.find, self._p(loc))
        return sorted(self._url(p) for p in found if p.lower().endswith(suffixes))

    def subfolders(self, loc: str) -> list[str]:
        if not self.remote:
            return sorted(p.name for p in Path(self._p(loc)).iterdir() if p.is_dir())
        entries = self._call("data.path", loc, self.fs.ls, self._p(loc), True)
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")

    def open(self, loc: str):
        return open(self._p(loc), "rb") if not self.remote else self.fs.open(self._p(loc), "rb")

    def read(self, loc: str) -> bytes:
        if not self.remote:
            return Path(self._p(loc)).read_bytes()
        return self.fs.cat_file(self._p(loc))

    def facts(self, loc: str) -> tuple[int, Any]:
        """(size, version): the modification time locally, the ETag (or time) remotely."""
        if not self.remote:
            st = os.stat(self._p(loc))
            return int(st.st_size), int(st.st_mtime_ns)
        info = self._call("data.path", loc, self.fs.info, self._p(loc))
        return int(info.get("size") or 0), str(info.get("e_tag") or info.get("last_modified") or "")

    def root(self, path: str) -> str:
        """The folder that file names in source keys and fingerprints are relative to: data.path
        itself when it is a folder, else the folder part before any glob character, else the
        file's."""
        if self.isdir(path):
            return path
        head = path
        for i, ch in enumerate(path):
            if ch in "*?[":
                head = path[:i]
                break
        sep = "/" if self.remote else os.sep
        if head.endswith(sep) and self.isdir(head):
            return head
        return posixpath.dirname(head) if self.remote else (os.path.dirname(head) or ".")

    def relpath(self, loc: str, root: str) -> str:
        if self.remote:
            return posixpath.relpath(self._p(loc), self._p(root) or "/")
        return os.path.relpath(loc, root)

    def expand(self, path: str, suffixes: tuple[str, ...]) -> list[str]:
        """data.path as a sorted list of files: a glob, a folder (recursive) or one file."""
        if any(ch in path for ch in "*?["):
            files = self.glob(path)
        elif self.isdir(path):
            files = self.find(path, suffixes)
        elif self.exists(path):
            files = [path]
        else:
            raise SourceError(f"data.path {path!r} does not exist")
        files = [f for f in files if f.lower().endswith(suffixes)]
        if not files:
            raise SourceError(f"data.path {path!r} holds no {'/'.join(suffixes)} files")
        return files


class Source:
    """Base class: ``len`` images, readable by index range. A subclass decorated with
    ``register_source`` is read for ``data.format: <name>``."""

    #: the ``data.format`` that selects this source
    name: ClassVar[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> Iterator[Record]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"format": type(self).__name__, "images": len(self)}

    def listing(self) -> list[list[Any]]:
        """[relative file name, size, mtime_ns, images] for every file the source reads."""
        raise NotImplementedError

    def labels_all(self) -> np.ndarray | None:
        """Every image's label when that is cheap to know before the job (no image data read);
        None otherwise (labels are then checked per image as units run)."""
        return None

    def plan(self) -> dict[str, Any] | None:
        """What a worker needs to open this dataset without listing it again (file names, image
        counts, labels, tar keys): the driver lists once and hands the plan to every actor
        (``open_source(..., plan=)`` -> ``from_plan``), which then reads no Parquet footer and no
        tar header before its first unit. It travels through Ray (pickled): plain values. None (the
        default): workers open the source with ``__init__``, listing it again, which is right but
        costs a listing per actor; fine when opening is cheap anyway (a memory-mapped array)."""
        return None

    @classmethod
    def from_plan(cls, cfg: DataConfig, storage_options: dict[str, Any] | None, plan: dict[str, Any]) -> "Source":
        """The source as ``__init__`` would make it, from ``plan()`` of the driver's source and
        without ``__init__``: sets ``cfg``, ``io`` and every attribute of the plan, then calls
        ``setup()``. An attribute ``__init__`` sets that is neither planned nor derived by
        ``setup()`` is missing on the workers (``tests/test_sources_contract.py`` catches that)."""
        source = cls.__new__(cls)
        source.cfg = cfg
        source.io = Files(cfg.path, storage_options)
        for name, value in plan.items():
            setattr(source, name, value)
        source.setup()
        return source

    def setup(self) -> None:
        """What ``__init__`` derives from the listed facts (``OffsetSource``: the offsets), shared
        with ``from_plan``, which calls it after setting the planned attributes."""

    def fingerprint(self) -> dict[str, Any]:
        """What a resume compares to make sure it reads the same dataset: the image count, a
        hash of the listing and, for up to ``MAX_LISTED`` files, the listing itself (so that the
        changed file can be named)."""
        import hashlib
        import json

        listing = self.listing()
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        out: dict[str, Any] = {"images": len(self), "files": len(listing), "sha256": digest}
        if len(listing) <= MAX_LISTED:
            out["listing"] = listing
        return out


#: data.format -> source class: the built-in ones below, and those other installed packages declare
#: under the entry-point group ``distributed_attr.sources`` (docs/contributing.md)
SOURCES: Registry[Source] = Registry("data format", group="distributed_attr.sources")


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: the source is read for ``data.format: <cls.name>``."""
    return SOURCES.register(cls)


#: fingerprints list their files up to this many (an image folder of 1.28 M files keeps the hash)
MAX_LISTED = 1000


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two dataset fingerprints, naming files where it can."""
    if not old or old.get("sha256") == new.get("sha256"):
        return []
    if "listing" in old and "listing" in new:
        a = {row[0]: row[1:] for row in old["listing"]}
        b = {row[0]: row[1:] for row in new["listing"]}
        out = [f"file {name!r} is gone" for name in sorted(set(a) - set(b))]
        out += [f"file {name!r} is new" for name in sorted(set(b) - set(a))]
        for name in sorted(set(a) & set(b)):
            if a[name] != b[name]:
                (s0, m0, n0), (s1, m1, n1) = a[name], b[name]
                what = [w for w, x, y in (("size", s0, s1), ("modification time", m0, m1), ("images", n0, n1)) if x != y]
                out.append(f"file {name!r} changed ({', '.join(what)})")
        if out:
            return out
    return [f"the dataset's file listing changed ({old.get('files')} -> {new.get('files')} files, "
            f"{old.get('images')} -> {new.get('images')} images)"]


class OffsetSource(Source):
    """A source made of files with known item counts; global index = running offset.

    A subclass's ``__init__`` sets ``io`` (a ``Files``), ``root`` (what file names are relative
    to), ``files`` and ``counts`` (images per file), and every other attribute ``read`` needs, then
    calls ``setup_offsets()``. It gets ``len``, ``files_for`` (the files holding an index range),
    ``listing()``, ``relname()`` and ``plan()``. ``PLANNED`` names the attributes besides
    ``files``, ``counts`` and ``root`` that workers opened from the plan need (labels, keys, ...):
    one left out is missing there, and ``read`` fails on every worker of a Ray job."""

    files: list[str]
    counts: list[int]

    def setup_offsets(self) -> None:
        """``offsets[f]``: the global index of file ``f``'s first image; ``offsets[-1] == len``."""
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64).tolist()

    def setup(self) -> None:
        self.setup_offsets()

    #: attributes besides ``files``, ``counts`` and ``root`` that a plan carries
    PLANNED: tuple[str, ...] = ()

    def plan(self) -> dict[str, Any]:
        return {"files": list(self.files), "counts": [int(c) for c in self.counts], "root": self.root,
                **{name: getattr(self, name) for name in self.PLANNED}}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def files_for(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(file number, first row in file, stop row in file) for every file holding part of the
        global range ``[start, stop)``, in order; nothing for an empty range or one past the end."""
        f = bisect.bisect_right(self.offsets, start) - 1
        while f < len(self.files) and self.offsets[f] < stop:
            lo = max(start, self.offsets[f]) - self.offsets[f]
            hi = min(stop, self.offsets[f + 1]) - self.offsets[f]
            if hi > lo:
                yield f, lo, hi
            f += 1

    def describe(self) -> dict[str, Any]:
        return {"format": type(self).__name__, "images": len(self), "files": len(self.files)}

    io: Files
    root: str

    def listing(self) -> list[list[Any]]:
        return [[self.io.relpath(f, self.root), *self.io.facts(f), int(n)] for f, n in zip(self.files, self.counts)]

    def relname(self, f: int) -> str:
        return self.io.relpath(self.files[f], self.root)


@register_source
class ParquetSource(OffsetSource):
    """Parquet shards in the Hugging Face ``datasets`` layout: an image column holding a struct
    ``{bytes, path}`` (or raw bytes) and an integer label column (optional)."""

    name: ClassVar[str] = "parquet"

    PLANNED = ("has_label",)

    def __init__(self, cfg: DataConfig, storage_options: dict[str, Any] | None = None):
        self.cfg = cfg
        self.io = Files(cfg.path, storage_options)
        self.root = self.io.root(cfg.path)
        self.files = self.io.expand(cfg.path, (".parquet",))
        self.counts = []
        for f in self.files:
            try:
                meta = self._open(f)
            except Exception as exc:  # a corrupt footer: say which file
                raise SourceError(f"cannot read Parquet file {f!r}: {exc}") from None
            names = meta.schema_arrow.names
            if cfg.image_column not in names:
                raise SourceError(
                    f"data.image_column {cfg.image_column!r} is not a column of {f!r}; columns: {names}"
                )
            self.counts.append(meta.metadata.num_rows)
        self.has_label = cfg.label_column in self._open(self.files[0]).schema_arrow.names
        if cfg.mask_column is not None:
            names = self._open(self.files[0]).schema_arrow.names
            if cfg.mask_column not in names:
                raise SourceError(f"data.mask_column {cfg.mask_column!r} is not a column of {self.files[0]!r}; "
                                  f"columns: {names}")
        self.setup_offsets()

    #: Parquet files kept open (footer parsed) per source: a unit usually reads one or two files,
    #: and consecutive units the same ones
    OPEN_FILES = 4

    def _open(self, f: str):
        import pyarrow.parquet as pq

        cache = self.__dict__.setdefault("_open_files", {})
        if f in cache:
            cache[f] = cache.pop(f)  # most recently used last
            return cache[f]
        # Remotely, a file object: pyarrow reads the footer and the row groups it needs by range.
        pf = pq.ParquetFile(self.io.open(f) if self.io.remote else f)
        cache[f] = pf
        while len(cache) > self.OPEN_FILES:
            cache.pop(next(iter(cache))).close()
        return pf

    def read(self, start: int, stop: int) -> Iterator[Record]:
        columns = [self.cfg.image_column] + ([self.cfg.label_column] if self.has_label else [])
        if self.cfg.mask_column is not None:
            columns.append(self.cfg.mask_column)
        for f, lo, hi in self.files_for(start, stop):
            pf = self._open(self.files[f])
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
            masks = (table.column(self.cfg.mask_column).to_pylist() if self.cfg.mask_column is not None
                     else [None] * len(images))
            base = self.offsets[f] + lo
            rel = self.relname(f)
            for i, (img, label, mask) in enumerate(zip(images, labels, masks)):
                name = ""
                if isinstance(img, dict):
                    name = img.get("path") or ""
                    img = img.get("bytes")
                if isinstance(mask, dict):
                    mask = mask.get("bytes")
                if self.has_label:
                    # a row without a valid label is a recorded failure, never a silent -1 or a
                    # truncated float (an unlabelled dataset has no label column at all; -1 is
                    # kept: Hugging Face's mark of an unlabelled row)
                    label, why = _parquet_label(label)
                    if why:
                        img = SourceError(f"row {lo + i} of {rel}: the label column {self.cfg.label_column!r} {why}")
                yield Record(base + i, img, int(label), name, f"{rel}:{lo + i}", mask)

    def labels_all(self) -> np.ndarray | None:
        """Every label (one column read per file), for checks before the job starts."""
        if not self.has_label:
            return None
        cols = [self._open(f).read(columns=[self.cfg.label_column]).column(0).to_numpy(zero_copy_only=False)
                for f in self.files]
        return np.asarray([_parquet_label(v)[0] for c in cols for v in c.tolist()], dtype=np.int64)


def _parquet_label(value: Any) -> tuple[int, str]:
    """(label, "") or (-1, why the value is no label): null, NaN (what pandas writes for a missing
    integer), a non-integral number, or not a number."""
    if value is None:
        return -1, "is null"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return -1, f"holds {value!r}, not an integer"
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and value == int(value)):
        return -1, f"holds {value}, not an integer"
    return int(value), ""


@register_source
class FolderSource(OffsetSource):
    """An image folder: one subfolder per class (labels = sorted subfolder order), or a flat folder
    (labels -1). Files sorted by path. A link to a directory anywhere below the folder is refused
    (``_refuse_directory_links``); links to files are read as the files they name."""

    name: ClassVar[str] = "folder"

    def __init__(self, cfg: DataConfig, storage_options: dict[str, Any] | None = None):
        self.io = Files(cfg.path, storage_options)
        root = cfg.path.rstrip("/") if self.io.remote else cfg.path
        if not self.io.isdir(root):
            raise SourceError(f"data.path {cfg.path!r} is not a directory")
        if not self.io.remote:
            _refuse_directory_links(root, cfg.path)  # before anything is listed
        self.classes = self.io.subfolders(root)
        join = posixpath.join if self.io.remote else os.path.join
        if self.classes:
            groups = [self.io.find(join(root, c), IMAGE_EXTENSIONS) for c in self.classes]
        else:
            groups = [[f for f in self.io.find(root, IMAGE_EXTENSIONS)
                       if self.io.relpath(f, root).count("/") == 0 and os.sep not in self.io.relpath(f, root)]]
        self.paths = [p for g in groups for p in g]
        self.labels = [i if self.classes else -1 for i, g in enumerate(groups) for _ in g]
        if not self.paths:
            raise SourceError(f"data.path {cfg.path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.files, self.counts = self.paths, [1] * len(self.paths)
        self.root = root
        self.setup_offsets()

    PLANNED = ("paths", "labels", "classes")

    def labels_all(self) -> np.ndarray | None:
        return np.asarray(self.labels, dtype=np.int64) if self.classes else None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> Iterator[Record]:
        for i in range(start, min(stop, len(self.paths))):
            try:
                payload: Any = self.io.read(self.paths[i])
            except OSError as exc:
                payload = exc
            yield Record(i, payload, self.labels[i], self.paths[i], self.relname(i))


def _refuse_directory_links(root: str, path: str) -> None:
    """Raise ``SourceError`` naming the first link to a directory below ``root`` (sorted walk).

    An image folder is never read through such a link: one back to the folder (``zz_loop -> .``)
    would read every image again as a class of its own, one to a folder inside it would read those
    images twice, and one out of it would silently add images (and, at the top level, a class)
    from elsewhere. ``root`` itself may be a link."""
    real_root = os.path.realpath(root)
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:  # as Path.rglob, which lists the files: unreadable folders are skipped
            continue
        below = []
        for e in entries:
            if not e.is_dir():  # (follows links: a link to a directory is a directory here)
                continue
            if e.is_symlink():
                target = os.path.realpath(e.path)
                rel = os.path.relpath(e.path, root)
                if target == real_root or real_root.startswith(target.rstrip(os.sep) + os.sep):
                    what = "it leads back to the data folder (a loop: every image would be read again)"
                elif target.startswith(real_root + os.sep):
                    what = "it leads to a folder inside the data folder (its images would be read twice)"
                else:
                    what = "it leads outside the data folder (its images would silently join the dataset)"
                raise SourceError(
                    f"data.path {path!r}: {rel!r} is a link to a directory ({target!r}); {what}. Image folders "
                    "are read without following links to directories: remove the link, or put the folder "
                    "itself there")
            below.append(e.path)
        stack.extend(reversed(below))


#: the members that hold a WebDataset sample's label (the first present is read), as text
WDS_LABEL_MEMBERS = ("cls", "label", "cls.txt", "label.txt")


def _wds_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@register_source
class WebDatasetSource(OffsetSource):
    """WebDataset ``.tar`` shards: files grouped into samples by key; the image is the first
    member with an image extension, the label a ``cls``/``label``/``cls.txt``/``label.txt``
    member holding an integer >= 0 as text. When any sample of the dataset has a label member,
    every sample must have a valid one: a sample without one is a failed image naming the
    reason. A dataset with no label member at all is read unlabelled (labels -1)."""

    name: ClassVar[str] = "webdataset"

    def __init__(self, cfg: DataConfig, storage_options: dict[str, Any] | None = None):
        self.io = Files(cfg.path, storage_options)
        self.root = self.io.root(cfg.path)
        self.files = self.io.expand(cfg.path, (".tar",))
        self.keys: list[list[str]] = []
        self.has_label = False
        for f in self.files:
            try:
                with self.io.open(f) as fh, tarfile.open(fileobj=fh) as tar:
                    named = [_wds_key(m.name) for m in tar.getmembers() if m.isfile()]
            except (tarfile.TarError, OSError) as exc:
                raise SourceError(f"cannot read tar shard {f!r}: {exc}") from None
            self.keys.append(list(dict.fromkeys(key for key, _ in named)))
            self.has_label = self.has_label or any(ext in WDS_LABEL_MEMBERS for _, ext in named)
        self.counts = [len(k) for k in self.keys]
        self.setup_offsets()

    PLANNED = ("keys", "has_label")

    def _label(self, key: str, parts: dict[str, bytes]) -> tuple[int, SourceError | None]:
        """(label, None), or (-1, the reason the sample has no valid label)."""
        if not self.has_label:
            return -1, None
        member = next((m for m in WDS_LABEL_MEMBERS if m in parts), None)
        if member is None:
            return -1, SourceError(f"sample {key!r} has no label (no {', '.join(WDS_LABEL_MEMBERS[:-1])} or "
                                   f"{WDS_LABEL_MEMBERS[-1]} member), while other samples of the dataset have one")
        text = parts[member].decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            return -1, SourceError(f"sample {key!r}: label {text[:40]!r} (member {member}) is not an integer")
        if label < 0:
            return -1, SourceError(f"sample {key!r}: label {label} (member {member}) is not a class index (>= 0)")
        return label, None

    def read(self, start: int, stop: int) -> Iterator[Record]:
        for f, lo, hi in self.files_for(start, stop):
            wanted = set(self.keys[f][lo:hi])
            samples: dict[str, dict[str, bytes]] = {}
            with self.io.open(self.files[f]) as fh, tarfile.open(fileobj=fh) as tar:
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
                label, bad_label = self._label(key, parts)
                payload: Any = (SourceError(f"sample {key!r} has no image member") if image is None
                                else bad_label or image)
                yield Record(self.offsets[f] + lo + i, payload, label, f"{self.files[f]}:{key}", f"{self.relname(f)}:{key}")


@register_source
class NumpySource(Source):
    """A ``.npy`` array of images (N, H, W), (N, H, W, C) or (N, C, H, W); uint8 (0..255), uint16
    (0..65535) or float (0..1; an image outside is a failed image). C = 2 or 4: the last channel is
    alpha, composited on ``data.alpha_background`` as for image files. Memory-mapped: a worker reads only its rows. ``labels_path``: a ``.npy`` of N integer
    labels. Never unpickles anything: an object array is refused."""

    name: ClassVar[str] = "numpy"

    def __init__(self, cfg: DataConfig, storage_options: dict[str, Any] | None = None):
        self.cfg = cfg
        self.io = Files(cfg.path, storage_options)
        self.array = self._load(cfg.path, "data.path")
        if self.array.dtype not in RAW_IMAGE_DTYPES and self.array.dtype.kind != "f":
            # other integer types have no agreed range: scaling them would be a guess
            raise SourceError(f"data.path {cfg.path!r}: expected an image array of dtype uint8 (0..255), "
                              f"uint16 (0..65535) or float (0..1), got dtype {self.array.dtype}")
        if self.array.ndim not in (3, 4):
            raise SourceError(f"{cfg.path!r}: expected images (N,H,W[,C]) or (N,C,H,W), got shape {self.array.shape}")
        self.labels = None
        if cfg.labels_path:
            where = f"data.labels_path {cfg.labels_path!r}"
            labels = self._load(cfg.labels_path, "data.labels_path", Files(cfg.labels_path, storage_options))
            if labels.ndim != 1:
                raise SourceError(f"{where}: expected one integer label per image, shape (N,), "
                                  f"got shape {labels.shape}")
            if labels.dtype.kind in "f":
                values = np.asarray(labels)
                if not (np.isfinite(values).all() and (values == np.round(values)).all()):
                    raise SourceError(f"{where}: expected integer labels, got non-integral {labels.dtype} values")
            elif labels.dtype.kind not in "biu":
                raise SourceError(f"{where}: expected integer labels, got dtype {labels.dtype}")
            if len(labels) != len(self.array):
                raise SourceError(f"{where} has {len(labels)} labels for {len(self.array)} images")
            self.labels = labels

    def _load(self, path: str, key: str, files: "Files | None" = None) -> np.ndarray:
        """Memory-map one ``.npy`` array (read whole from object storage; never with
        ``allow_pickle``); every way it can fail becomes a ``SourceError`` naming ``key``, the path
        and what is wrong."""
        where = f"{key} {path!r}"
        files = files or self.io
        if not files.exists(path):
            raise SourceError(f"{where} does not exist")
        if files.isdir(path):
            raise SourceError(f"{where} is a directory; format 'numpy' expects a .npy file")
        try:
            with files.open(path) as fh:
                magic = fh.read(6)
        except OSError as exc:
            raise SourceError(f"{where}: cannot read: {exc.strerror or exc}") from None
        if magic != b"\x93NUMPY":
            kind = " (a .npz archive; save one array with numpy.save)" if magic[:2] == b"PK" else ""
            raise SourceError(f"{where} is not a .npy file{kind}")
        try:
            array = (np.load(io.BytesIO(files.read(path)), allow_pickle=False) if files.remote
                     else np.load(path, mmap_mode="r", allow_pickle=False))
        except ValueError as exc:
            if "object" in str(exc).lower() or "pickle" in str(exc).lower():
                raise SourceError(f"{where} holds Python objects (dtype object), which are never unpickled; "
                                  "save a numeric array") from None
            raise SourceError(f"{where}: not a readable .npy array: {exc}") from None
        except Exception as exc:  # truncated or corrupt header/data
            raise SourceError(f"{where}: not a readable .npy array: {type(exc).__name__}: {exc}") from None
        if not isinstance(array, np.ndarray):
            raise SourceError(f"{where} is not a single .npy array")
        if array.dtype.hasobject:
            raise SourceError(f"{where} holds Python objects (dtype {array.dtype}); save a numeric array")
        return array

    def __len__(self) -> int:
        return len(self.array)

    def read(self, start: int, stop: int) -> Iterator[Record]:
        block = np.asarray(self.array[start:stop])
        labels = np.asarray(self.labels[start:stop]) if self.labels is not None else None
        for i in range(len(block)):
            yield Record(start + i, block[i], int(labels[i]) if labels is not None else -1, key=str(start + i))

    def listing(self) -> list[list[Any]]:
        paths = [p for p in (self.cfg.path, self.cfg.labels_path) if p]
        return [[posixpath.basename(p), *self.io.facts(p), len(self)] for p in paths]

    def labels_all(self) -> np.ndarray | None:
        return None if self.labels is None else np.asarray(self.labels, dtype=np.int64)


def open_source(cfg: DataConfig, storage_options: dict[str, Any] | None = None,
                plan: dict[str, Any] | None = None) -> Source:
    """The configured source; ``data.path`` may be a local path or an object-store URL. ``plan``
    (``Source.plan()`` of the driver's source): open from it, without listing the dataset again."""
    if plan is not None:
        return SOURCES.get(cfg.format).from_plan(cfg, storage_options, plan)
    return SOURCES.get(cfg.format)(cfg, storage_options)


# ------------------------------------------------------------------------------------------------
# Decoding and preprocessing
# ------------------------------------------------------------------------------------------------


def _check_pixels(w: int, h: int, max_pixels: int | None) -> None:
    """Refuse an image larger than ``max_pixels`` before its pixels are decoded or allocated."""
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"image of {w}x{h} = {w * h / 1e6:.0f} MPix exceeds data.max_pixels ({max_pixels}); "
                         "possible decompression bomb")


#: the EXIF tag that says how to turn the stored pixels to show the image upright (1: as stored)
EXIF_ORIENTATION = 0x0112
#: 16-bit grey modes (PNG and TIFF), read with their byte order and divided by 65535
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
#: modes PIL converts to RGB by exact formulas (bilevel, padding, other 8-bit colour spaces)
_MODES_TO_RGB = {"1": "L", "RGBX": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "CMYK": "RGB"}
#: modes with an alpha channel (``La``, ``RGBa``: premultiplied); ``PA`` and palettes become RGBA first
_MODES_ALPHA = ("RGBA", "LA", "La", "RGBa")
#: ITU-R 601-2 luma, PIL's RGB -> L, for images composited in float
_LUMA = (0.299, 0.587, 0.114)


def _orientation(im: Any) -> int:
    """The image's EXIF orientation (2..8), or 1 when it has none or an invalid one (viewers
    ignore those too)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as exc:  # a damaged EXIF block: the orientation is unknown
        raise ValueError(f"cannot read the image's EXIF orientation (data.exif_orientation is true): "
                         f"{type(exc).__name__}: {exc}") from None
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


#: embedded profiles up to this size are looked up in ``_is_srgb_profile``'s cache (sRGB profiles
#: are 0.5-61 KB; larger ones, such as CMYK printer profiles, are applied without a look-up)
_PROFILE_CACHED_BYTES = 128 * 1024


#: the colours ``_is_srgb_profile`` converts: 16 grey levels, the primaries and secondaries
_PROFILE_PROBE = np.asarray([[(v, v, v) for v in range(0, 256, 17)]
                             + [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                                (128, 32, 200)]], dtype=np.uint8)


@functools.lru_cache(maxsize=32)
def _is_srgb_profile(icc: bytes) -> bool:
    """An embedded RGB profile that converts to sRGB as the identity (every probe colour within
    one level): converting with it would change nothing, so it is skipped. Decided by what the
    profile does, never by its name ("sRGB-elle-V2-g10" is a linear profile). Any other profile
    is applied."""
    try:
        from PIL import Image, ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return False
        out = ImageCms.profileToProfile(Image.fromarray(_PROFILE_PROBE, "RGB"), profile,
                                        ImageCms.createProfile("sRGB"), outputMode="RGB")
        return int(np.abs(np.asarray(out, dtype=np.int16) - _PROFILE_PROBE).max()) <= 1
    except Exception:  # cannot be read: not known to be sRGB (applying it then fails, naming it)
        return False


def _foreign_profile(im: Any) -> bytes | None:
    """The image's embedded ICC profile when it is not sRGB's, else None."""
    icc = im.info.get("icc_profile")
    if not icc or (len(icc) <= _PROFILE_CACHED_BYTES and _is_srgb_profile(bytes(icc))):
        return None
    return bytes(icc)


#: per decode thread, the last few sRGB transforms built (LittleCMS objects are not shared between
#: threads): building one takes about as long as applying it to a 500 x 375 image
_TRANSFORMS = threading.local()
_TRANSFORMS_KEPT = 8


def _to_srgb(im: Any, icc: bytes) -> Any:
    """``im`` (L, RGB, CMYK or 16-bit grey) converted from its embedded ICC profile to sRGB (RGB,
    8 bits) by LittleCMS, with ImageCms's default (perceptual) rendering intent."""
    try:
        from PIL import ImageCms
    except ImportError:
        raise ValueError("the image carries an ICC colour profile and this Pillow has no LittleCMS "
                         "(PIL.ImageCms): it cannot be converted to sRGB") from None
    cache = _TRANSFORMS.__dict__.setdefault("transforms", {})
    transform = cache.get((icc, im.mode))
    if transform is None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        except Exception as exc:
            raise ValueError(f"the image's ICC colour profile cannot be read ({exc}); it cannot be converted "
                             "to sRGB") from None
        try:
            transform = ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), im.mode, "RGB")
        except Exception as exc:
            name = ImageCms.getProfileDescription(source).strip() or "unnamed"
            raise ValueError(f"cannot convert the image (mode {im.mode!r}) from its ICC colour profile "
                             f"{name!r} to sRGB: {exc}") from None
        while len(cache) >= _TRANSFORMS_KEPT:
            cache.pop(next(iter(cache)))
        cache[(icc, im.mode)] = transform
    return ImageCms.applyTransform(im, transform)


def _high_depth(im: Any) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image as float32 (H, W) in [0, 1], or a
    ``ValueError`` naming the mode and the range it holds.

    16-bit: divided by 65535. 32-bit integers (``I``): read as 16-bit, the range PNG and TIFF
    writers store there, so values must lie in 0..65535. Float (``F``): values must lie in [0, 1]."""
    a = np.asarray(im)
    if im.mode in _MODES_16BIT:
        return a.astype(np.float32) / np.float32(65535)
    if im.mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"image mode 'I' (32-bit integers) holds values {lo}..{hi}; such images are "
                             "read as 16-bit (0..65535, as PNG and TIFF writers store 16-bit images), and "
                             "other ranges have no known scale")
        return a.astype(np.float32) / np.float32(65535)
    if not np.isfinite(a).all():
        raise ValueError("image mode 'F' (32-bit float) holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"image mode 'F' (32-bit float) holds values {lo:g}..{hi:g}; float images are "
                         "read as pixel values in [0, 1], and other ranges have no known scale")
    return a.astype(np.float32, copy=True)


def _chw(arr: np.ndarray) -> torch.Tensor:
    """8-bit (H, W) or (H, W, C) -> contiguous float32 (C, H, W) in [0, 1]."""
    hwc = torch.from_numpy(arr)
    # channels first before the float conversion: one pass writes a contiguous float tensor
    chw = hwc.unsqueeze(0) if hwc.ndim == 2 else hwc.permute(2, 0, 1)
    return chw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _decode_pil(im: Any, channels: int, exif_orientation: bool, background: list[float] | None) -> torch.Tensor:
    """An opened PIL image -> float32 (``channels``, H, W) in [0, 1], faithfully or not at all.

    - EXIF orientation applied (``exif_orientation``).
    - 8-bit L / RGB without transparency or a colour profile other than sRGB: PIL's pixels / 255
      (the fast path, bit for bit as before); PIL's RGB -> L for one channel.
    - 16-bit, 32-bit integer and float grey: scaled by their range (``_high_depth``).
    - Transparency (alpha, a palette's transparent entries, a PNG's transparent colour):
      composited on ``background`` in float.
    - An embedded ICC profile other than sRGB (and CMYK with one): converted to sRGB by LittleCMS;
      CMYK without one by PIL's formula (R = (255 - C)(255 - K) / 255, ...).
    - ``background`` None (a mask: values, not colours): alpha dropped, profiles ignored.
    - Anything else: a ``ValueError`` naming the mode."""
    transparent = im.info.get("transparency")
    if (background is not None and im.mode == "RGB" and isinstance(transparent, tuple)
            and (max(transparent) > 255 or _raw_16bit(im))):
        # Pillow reads a 16-bit RGB PNG as 8 bits but keeps its transparent colour (tRNS) in 16
        # bits: no pixel would match it, and the transparent parts would keep their stored colour
        raise ValueError("a 16-bit RGB image with a transparent colour (PNG tRNS) cannot be read "
                         "faithfully: Pillow reads its pixels as 8 bits; save it with an alpha channel")
    if exif_orientation and _orientation(im) != 1:
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)
    target = "L" if channels == 1 else "RGB"
    icc = _foreign_profile(im) if background is not None else None
    if im.mode in ("L", "RGB") and icc is None and "transparency" not in im.info:
        if im.mode != target:
            im = im.convert(target)
        return _chw(np.array(im, dtype=np.uint8))  # 8 bits: finite
    alpha = None
    if im.mode in _MODES_16BIT or im.mode in ("I", "F"):
        if icc is not None:
            if im.mode not in _MODES_16BIT:
                raise ValueError(f"image mode {im.mode!r} carries an ICC colour profile, which cannot be "
                                 "applied to 32-bit pixels")
            transparent = im.info.get("transparency")
            if background is not None and isinstance(transparent, int):
                # the transparent grey level, found before the conversion (which keeps no info)
                alpha = ((np.asarray(im) != transparent) * 255).astype(np.uint8)
            im, icc = _to_srgb(im, icc), None  # 8-bit RGB: within the 8-bit copy's quantisation
        else:
            grey = _high_depth(im)
            t = torch.from_numpy(grey)[None]
            transparent = im.info.get("transparency")
            if background is not None and isinstance(transparent, int):
                a = torch.from_numpy((np.asarray(im) != transparent).astype(np.float32))[None]
                bg = torch.tensor(background, dtype=torch.float32).view(-1, 1, 1)
                t = t * a + bg * (1 - a)  # (1 or 3, H, W)
            return _channels(t, channels)
    if im.mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif im.mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("LA")  # grey stays grey: a grey ICC profile still applies
    elif im.mode == "PA" or (im.mode == "RGB" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in _MODES_ALPHA:
        if im.mode in ("La", "RGBa"):  # premultiplied (Pillow has no La -> RGBA)
            im = im.convert("LA" if im.mode == "La" else "RGBA")
        if background is not None:
            alpha = np.array(im.getchannel("A"), dtype=np.uint8)
        im = im.convert("L" if im.mode == "LA" else "RGB")  # the colour values, alpha dropped
    if im.mode in _MODES_TO_RGB and not (im.mode == "CMYK" and icc is not None):
        im = im.convert(_MODES_TO_RGB[im.mode])  # CMYK without a profile: PIL's formula
    if icc is not None:  # L, RGB or CMYK; a profile of another colour space fails, naming it
        im = _to_srgb(im, icc)
    if im.mode not in ("L", "RGB"):
        raise ValueError(f"image mode {im.mode!r} cannot be converted faithfully to {target} "
                         "(modes read: 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV, with or without alpha; "
                         "I;16, I and F grey)")
    if alpha is None:
        if im.mode != target:
            im = im.convert(target)
        return _chw(np.array(im, dtype=np.uint8))
    rgb = _chw(np.array(im.convert("RGB"), dtype=np.uint8))
    a = _chw(alpha)
    bg = torch.tensor(background, dtype=torch.float32).view(-1, 1, 1)
    return _channels(rgb * a + bg * (1 - a), channels)


def _raw_16bit(im: Any) -> bool:
    """Whether a not yet loaded image stores 16 bits per sample (its decoder's raw mode)."""
    return any("16" in str(tile[3]) for tile in (getattr(im, "tile", None) or []) if len(tile) > 3)


def _channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(1 or 3, H, W) float -> (``channels``, H, W): grey repeated, or RGB's luma (ITU-R 601-2)."""
    if t.shape[0] == channels:
        return t.contiguous()
    if channels == 1:
        return (t[0] * _LUMA[0] + t[1] * _LUMA[1] + t[2] * _LUMA[2])[None].contiguous()
    return t.expand(3, -1, -1).contiguous()


def _to_float_chw(payload: Any, channels: int, max_pixels: int | None = None, *, exif_orientation: bool = True,
                  background: list[float] | None = None) -> torch.Tensor:
    """Decode a payload into float32 (C, H, W) in [0, 1] with ``channels`` channels.

    An image of more than ``max_pixels`` pixels is refused (``ValueError``) from its header,
    before anything is decoded: PIL alone only warns up to 2x ``Image.MAX_IMAGE_PIXELS``. Encoded
    images are decoded faithfully or refused (``_decode_pil``); ``background``: the colour that
    transparent parts are composited on. None: a mask, whose values are read as they are stored
    (transparency and colour profiles ignored)."""
    if isinstance(payload, BaseException):
        raise payload
    if payload is None:
        raise ValueError("empty image payload")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        from PIL import Image

        try:
            opened = Image.open(io.BytesIO(bytes(payload)))  # lazy: reads the header only
        except Image.DecompressionBombError as exc:  # beyond PIL's own hard limit
            raise ValueError(f"{exc} (data.max_pixels is {max_pixels}); possible decompression bomb") from None
        with opened as im:
            _check_pixels(im.size[0], im.size[1], max_pixels)
            return _decode_pil(im, channels, exif_orientation, background)
    # a raw array (NumPy sources)
    arr = np.asarray(payload)
    if arr.ndim == 2:
        _check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    elif arr.ndim == 3:
        channels_last = arr.shape[-1] in RAW_CHANNELS and arr.shape[0] not in RAW_CHANNELS
        h, w = arr.shape[:2] if channels_last else arr.shape[1:]
        _check_pixels(w, h, max_pixels)
    if arr.dtype in RAW_IMAGE_DTYPES:
        t = torch.from_numpy(arr.astype(np.float32) / RAW_IMAGE_DTYPES[arr.dtype])
    elif arr.dtype.kind == "f":
        t = torch.from_numpy(arr.astype(np.float32))
        if not torch.isfinite(t).all():
            raise ValueError("image holds NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:  # the same rule as a float ('F') image file
            raise ValueError(f"float image holds values {lo:g}..{hi:g}, outside [0, 1]: scale it to [0, 1] "
                             "(float arrays are read as they are)")
    else:
        raise ValueError(f"raw image of dtype {arr.dtype}: expected uint8 (0..255), uint16 (0..65535) "
                         "or float (0..1)")
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3 and t.shape[-1] in RAW_CHANNELS and t.shape[0] not in RAW_CHANNELS:
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in RAW_CHANNELS:
        raise ValueError(f"raw image of shape {tuple(arr.shape)}: expected (H, W), (H, W, C) or (C, H, W) "
                         "with C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGB, alpha)")
    if t.shape[0] in (2, 4):  # grey or colour with alpha: composited as image files are
        if background is None:  # a mask: values as stored, the alpha ignored
            t = t[:-1]
        else:
            alpha, t = t[-1:], t[:-1]
            bg = torch.tensor(background, dtype=t.dtype).reshape(-1, 1, 1)
            if bg.shape[0] == 3 and t.shape[0] == 1:
                t = t.expand(3, -1, -1)  # grey on a coloured background is colour (as PIL's LA -> RGBA)
            t = t * alpha + bg.expand(t.shape[0], 1, 1) * (1 - alpha)
    if t.shape[0] != channels:
        if channels == 1:
            # ITU-R 601-2 luma, as PIL's convert("L") computes it for image files
            t = (t * _LUMA.reshape(3, 1, 1)).sum(0, keepdim=True) if t.shape[0] == 3 else t.mean(0, keepdim=True)
        elif t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        else:
            raise ValueError(f"cannot convert {t.shape[0]} channels to {channels}")
    return t.contiguous()


#: the channel counts a raw image array may have: grey, grey + alpha, RGB, RGB + alpha
RAW_CHANNELS = (1, 2, 3, 4)
#: raw image arrays (NumPy sources) of these integer dtypes are divided by their range
RAW_IMAGE_DTYPES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
#: the weights of R, G, B in grey (ITU-R 601-2 luma, PIL's convert("L"))
_LUMA = torch.tensor([0.299, 0.587, 0.114])

#: the first bytes of every JPEG file (start-of-image marker, then a marker's first byte)
JPEG_MAGIC = b"\xff\xd8\xff"


def decode_image(payload: Any, cfg: DataConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Payload -> normalised float32 (C, S, S): resize the shorter side to S (bilinear, antialiased),
    centre-crop, subtract ``mean`` and divide by ``std``. Raises on a corrupt image.

    ``device`` (a CUDA device): a JPEG payload is decoded there by nvJPEG and resized there; the
    result lies on that device. nvJPEG is not guaranteed to decode bit for bit as libjpeg does, so
    such maps equal the CPU path's only within tolerance. Other payloads decode on the CPU, and so do
    JPEGs that need more than nvJPEG does (``_nvjpeg_can_decode``: an EXIF orientation, CMYK, a
    colour profile other than sRGB)."""
    if device is not None and torch.device(device).type == "cuda" and isinstance(payload, (bytes, bytearray)) \
            and bytes(payload[:3]) == JPEG_MAGIC and _nvjpeg_can_decode(bytes(payload), cfg):
        t = _jpeg_on_device(bytes(payload), cfg, torch.device(device))
    else:
        t = _to_float_chw(payload, cfg.channels, cfg.max_pixels, exif_orientation=cfg.exif_orientation,
                          background=cfg.alpha_background)
    return _resize_normalise(t, cfg)


def decode_mask(payload: Any, cfg: DataConfig) -> torch.Tensor:
    """A ground-truth mask payload (an image: nonzero = inside) -> bool (S, S), resized and cropped
    exactly as ``decode_image`` resizes and crops the image (bilinear, antialiased, then >= 0.5), so
    that it stays aligned with the image's pixels. Raises when missing or corrupt."""
    if payload is None:
        raise ValueError(f"the image has no mask (data.mask_column {cfg.mask_column!r} is empty)")
    t = _to_float_chw(payload, 1, cfg.max_pixels, exif_orientation=cfg.exif_orientation, background=None)
    t = (t > 0).float()
    return _resize_normalise(t, cfg, normalise=False)[0] >= 0.5


def decode_sample(payload: Any, mask: Any, cfg: DataConfig, device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(decode_image(payload), decode_mask(mask) or None)``: what a worker decodes per record."""
    image = decode_image(payload, cfg, device)
    if cfg.mask_column is None:
        return image, None
    try:
        return image, decode_mask(mask, cfg)
    except Exception as exc:  # say that it is the mask, not the image, that failed
        raise ValueError(f"ground-truth mask (data.mask_column {cfg.mask_column!r}): "
                         f"{type(exc).__name__}: {exc}") from exc


def _nvjpeg_can_decode(payload: bytes, cfg: DataConfig) -> bool:
    """Whether nvJPEG's decode gives this JPEG's pixels as ``_decode_pil`` would: 8-bit L or RGB
    (not CMYK), no colour profile other than sRGB, and no EXIF orientation to apply (nvJPEG
    applies none). Reads the header only; a header PIL cannot read is left to the CPU path,
    which names the error."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as im:
            return (im.mode in ("L", "RGB") and _foreign_profile(im) is None
                    and not (cfg.exif_orientation and _orientation(im) != 1))
    except Exception:
        return False


def _jpeg_on_device(payload: bytes, cfg: DataConfig, device: torch.device) -> torch.Tensor:
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    with Image.open(io.BytesIO(payload)) as im:  # the header only: refuse a bomb before decoding
        _check_pixels(im.size[0], im.size[1], cfg.max_pixels)
    mode = ImageReadMode.GRAY if cfg.channels == 1 else ImageReadMode.RGB
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return decode_jpeg(data, mode=mode, device=device).float().div_(255.0)


def _resize_normalise(t: torch.Tensor, cfg: DataConfig, normalise: bool = True) -> torch.Tensor:
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
    if not normalise:
        return t.contiguous()
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    return ((t - mean) / std).contiguous()


# Last, once every name of this module exists: a plugin may import any of them.
SOURCES.load_plugins()
