"""The contract every registered data source keeps, checked for each name in ``SOURCES``: a source
opened from the driver's plan (as every Ray actor opens it) reads exactly what the driver's own
source reads, and opening it lists nothing.

A new built-in source is picked up from the registry as soon as it registers; its tests fail here
until it has a dataset builder in ``DATASETS`` (a few real images written in its format). A source
of another installed package (entry point ``distributed_attr.sources``) is skipped here."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from distributed_attr.config import DataConfig
from distributed_attr.data import write_image_folder, write_parquet_shards, write_webdataset
from distributed_attr.io import sources
from distributed_attr.io.sources import SOURCES, Record, decode_image, open_source

#: images in every dataset: a few files, ranges that cross file (and row-group) boundaries
N = 24


def _parquet(root: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, dict[str, Any]]:
    write_parquet_shards(root, images, labels, shards=3, row_group_size=4)
    return root, {}


def _webdataset(root: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, dict[str, Any]]:
    write_webdataset(root, images, labels, shards=3)
    return root, {}


def _folder(root: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, dict[str, Any]]:
    write_image_folder(root, images, labels)
    return root, {}


def _numpy(root: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, dict[str, Any]]:
    np.save(root / "x.npy", images)
    np.save(root / "y.npy", labels)
    return root / "x.npy", {"labels_path": str(root / "y.npy")}


#: data.format -> (root folder, images, labels) -> (data.path, other DataConfig fields): writes a
#: dataset of those images in that format under root
DATASETS: dict[str, Callable[[Path, np.ndarray, np.ndarray], tuple[Path, dict[str, Any]]]] = {
    "parquet": _parquet, "webdataset": _webdataset, "folder": _folder, "numpy": _numpy,
}

#: what opening a source may touch, patched to be recorded while a source opens from its plan
STORAGE_CALLS = ("isdir", "exists", "glob", "find", "subfolders", "open", "read", "facts", "root", "expand")


@pytest.fixture(scope="module", params=SOURCES.names())
def opened(request, tmp_path_factory, digits_small):
    """(config, images written, the driver's source, its plan after a trip through pickle)."""
    fmt = request.param
    if fmt not in DATASETS:
        module = SOURCES.get(fmt).__module__
        if module != sources.__name__:  # another installed package's source: its own tests test it
            pytest.skip(f"source {fmt!r} comes from {module!r}, and this file has no dataset builder for it")
        pytest.fail(f"source {fmt!r} is registered but tests/test_sources_contract.py has no dataset builder "
                    f"for it: add one to DATASETS")
    images, labels = digits_small[0][:N], digits_small[1][:N]
    root = tmp_path_factory.mktemp(fmt)
    path, extra = DATASETS[fmt](root, images, labels)
    cfg = DataConfig(format=fmt, path=str(path), image_size=32, channels=1, mean=[0.0], std=[1.0], **extra)
    source = open_source(cfg)
    plan = source.plan()
    # as Ray ships it to the actors (ray.put): it must pickle, and the workers get a copy
    shipped = pickle.loads(pickle.dumps(plan)) if plan is not None else None
    return cfg, images, source, shipped


def _records(src: sources.Source, start: int, stop: int) -> list[Record]:
    return list(src.read(start, stop))


def _described(recs: list[Record]) -> list[tuple[int, int, str, str]]:
    return [(r.index, r.label, r.key, r.name) for r in recs]


def test_every_built_in_source_has_a_dataset_here():
    built_in = [n for n in SOURCES.names() if SOURCES.get(n).__module__ == sources.__name__]
    assert sorted(DATASETS) == built_in, "a source without a builder is untested by this file"


def test_opening_from_the_plan_lists_nothing(opened, monkeypatch):
    """From the plan, an actor opens the source without listing files, reading a Parquet footer,
    a tar header or an array header: the driver did that once."""
    import pyarrow.parquet as pq

    cfg, _, source, plan = opened
    if plan is None:  # no plan: workers open it with __init__ (cheap: a memory-mapped array)
        return
    touched: list[str] = []
    for name in STORAGE_CALLS:
        real = getattr(sources.Files, name)
        monkeypatch.setattr(sources.Files, name,
                            lambda self, *a, _n=name, _f=real, **k: (touched.append(_n), _f(self, *a, **k))[1])
    for module, name in ((pq, "ParquetFile"), (tarfile, "open"), (np, "load")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **k: (touched.append(_n), _f(*a, **k))[1])
    planned = open_source(cfg, None, plan)
    assert touched == [], f"opening {cfg.format!r} from its plan touched storage: {touched}"
    assert type(planned) is type(source)


def test_the_planned_source_reads_what_the_drivers_source_reads(opened):
    """Same length, records (indices, labels, keys, names, payloads and decoded pixels), labels
    and fingerprint: a planned attribute left out fails here, as it would on every worker."""
    cfg, _, source, plan = opened
    planned = open_source(cfg, None, plan)
    assert len(planned) == len(source) == N
    start, stop = 5, N - 4  # across files
    a, b = _records(source, start, stop), _records(planned, start, stop)
    assert [r.index for r in a] == list(range(start, stop))
    assert _described(b) == _described(a)
    for x, y in zip(a, b):
        assert type(x.payload) is type(y.payload) and np.array_equal(np.asarray(x.payload), np.asarray(y.payload))
    decoded = [torch.stack([decode_image(r.payload, cfg) for r in recs]) for recs in (a, b)]
    torch.testing.assert_close(decoded[1], decoded[0], rtol=0, atol=0)
    assert planned.fingerprint() == source.fingerprint()
    la, lb = source.labels_all(), planned.labels_all()
    assert (la is None) == (lb is None)
    if la is not None:
        np.testing.assert_array_equal(lb, la)
        assert la.dtype == np.int64 and la.shape == (N,)
        np.testing.assert_array_equal(la[start:stop], [r.label for r in a])


def test_every_image_is_read_once_in_index_order(opened):
    """``read(0, len)`` gives indices 0..len-1 in order, and its pixels are the images written
    (each once, in whatever order the format keeps them)."""
    cfg, images, source, plan = opened
    recs = _records(open_source(cfg, None, plan), 0, N)
    assert [r.index for r in recs] == list(range(N))
    assert len({r.key for r in recs}) == N  # keys tell the images apart
    got = torch.stack([decode_image(r.payload, cfg) for r in recs]).squeeze(1).mul(255).round().to(torch.uint8)
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, got.numpy())) == sorted(map(key, images))


@pytest.mark.parametrize("start, stop", [(7, 7), (N, N + 5), (N + 3, N + 9), (N - 2, N + 9)])
def test_empty_ranges_and_ranges_past_the_end(opened, start, stop):
    """An empty range yields nothing; a range past the end yields the indices that exist."""
    cfg, _, source, plan = opened
    for src in (source, open_source(cfg, None, plan)):
        assert [r.index for r in _records(src, start, stop)] == list(range(start, min(stop, N)))
