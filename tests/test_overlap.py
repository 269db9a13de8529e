"""The overlapped stages inside a worker (issue: keep the GPUs fed): reading and decoding run ahead
of the compute and writing runs behind it, yet the store is the sequential pipeline's, bit for bit,
memory stays bounded, and a failure in any stage fails its unit exactly as before."""
from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from distributed_attr import pipeline
from distributed_attr.config import Config
from distributed_attr.pipeline import UnitProcessor
from distributed_attr.runner import JobError, run

pytestmark = pytest.mark.usefixtures("one_thread")


def every_array(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(group, prefix=""):
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                if name != "lease":
                    walk(node, f"{prefix}{name}/")
            else:
                out[f"{prefix}{name}"] = node[:]
    walk(g)
    return out


@pytest.fixture(scope="module")
def with_corrupt_images(tmp_path_factory, digits_small):
    """Three Parquet shards of PNG digits with a corrupt image in two different units."""
    from distributed_attr.data import _png

    images, labels = digits_small
    d = tmp_path_factory.mktemp("corrupt")
    payloads = [{"bytes": _png(im), "path": f"{i}.png"} for i, im in enumerate(images[:60])]
    for bad in (5, 37):
        payloads[bad] = {"bytes": b"\x89PNG truncated", "path": f"{bad}.png"}
    for k in range(3):
        rows = slice(20 * k, 20 * (k + 1))
        pq.write_table(pa.table({"image": payloads[rows], "label": labels[:60][rows]}), d / f"part-{k}.parquet")
    return d


def config(make_config, data, store, **run_over):
    cfg = make_config(data, store, unit_size=16, batch_size=5, **run_over)
    cfg["methods"] = {"saliency": {}, "smoothgrad": {"samples": 3}}
    cfg["spectra"] = {"enabled": True}
    return cfg


def test_overlapped_store_equals_the_sequential_one_bit_for_bit(tmp_path, with_corrupt_images, make_config):
    seq = run(config(make_config, with_corrupt_images, tmp_path / "seq.zarr", decode_workers=0), progress=False)
    ovl = run(config(make_config, with_corrupt_images, tmp_path / "ovl.zarr", decode_workers=2, prefetch_units=2),
              progress=False)
    assert sorted(seq.failures) == sorted(ovl.failures) == [5, 37]
    a, b = every_array(tmp_path / "seq.zarr"), every_array(tmp_path / "ovl.zarr")
    assert set(a) == set(b) and "spectra/saliency" in a
    for name in a:
        if name == "units/seconds":
            continue  # wall time, the one thing that should differ
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not b["ok"][[5, 37]].any() and b["ok"].sum() == 58


def processor(make_config, data, store, **run_over) -> UnitProcessor:
    """A worker's processor over a freshly created store (as the runner prepares it)."""
    from distributed_attr.runner import prepare_store

    cfg = Config.from_dict(config(make_config, data, store, **run_over))
    _, probe, lease = prepare_store(cfg, resume=False, overwrite=False)
    lease.release()
    return probe


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("slow", ["writer", "decoder"])
def test_a_slow_stage_never_lets_the_units_held_grow_past_the_bound(
        tmp_path, parquet_dir, make_config, monkeypatch, prefetch, slow):
    proc = processor(make_config, parquet_dir, tmp_path / "s.zarr", decode_workers=2, prefetch_units=prefetch)
    if slow == "writer":
        write = UnitProcessor._write
        monkeypatch.setattr(UnitProcessor, "_write", lambda self, u, a: (time.sleep(0.3), write(self, u, a))[1])
    else:
        decode = pipeline.decode_sample
        monkeypatch.setattr(pipeline, "decode_sample", lambda *a: (time.sleep(0.01), decode(*a))[1])
    results = list(proc.process_units(range(6)))
    assert [r.unit for r in results] == list(range(6))
    bound = prefetch + 2
    assert proc.stages.max_held <= bound
    if slow == "writer":  # the bound is reached (the count is real), never passed
        assert proc.stages.max_held == bound
    assert proc.stages.held == 0
    assert np.isfinite(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["maps/saliency"][:]).all()


def test_a_failing_read_fails_its_unit_and_nothing_after_it_is_written(tmp_path, parquet_dir, make_config,
                                                                       monkeypatch):
    proc = processor(make_config, parquet_dir, tmp_path / "s.zarr", decode_workers=2, prefetch_units=2)
    read, written = UnitProcessor._read, []

    def failing_read(self, unit, inline):
        if unit == 3:
            raise OSError("shard unreadable")
        return read(self, unit, inline)

    write = UnitProcessor._write
    monkeypatch.setattr(UnitProcessor, "_read", failing_read)
    monkeypatch.setattr(UnitProcessor, "_write", lambda self, u, a: (written.append(u), write(self, u, a))[1])
    done = []
    with pytest.raises(OSError, match="shard unreadable") as info:
        for res in proc.process_units(range(6)):
            done.append(res.unit)
    assert info.value.unit == 3
    assert done == [0, 1, 2] and written == [0, 1, 2]
    assert proc.stages.held == 0


def test_a_failing_write_names_its_unit_in_the_job_error(tmp_path, parquet_dir, make_config, monkeypatch):
    write = UnitProcessor._write

    def failing_write(self, unit, arrays):
        if unit == 2:
            raise OSError("disk full")
        write(self, unit, arrays)

    monkeypatch.setattr(UnitProcessor, "_write", failing_write)
    cfg = config(make_config, parquet_dir, tmp_path / "s.zarr", decode_workers=1)
    with pytest.raises(JobError, match="unit 2 failed: OSError: disk full"):
        run(cfg, progress=False)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g["units/done"][:2].all() and not g["units/done"][2:].any()


def test_a_consumer_that_stops_early_leaves_no_stage_running(tmp_path, parquet_dir, make_config):
    proc = processor(make_config, parquet_dir, tmp_path / "s.zarr", decode_workers=2, prefetch_units=2)
    results = proc.process_units(range(6))
    assert next(results).unit == 0
    results.close()
    assert proc.stages.held == 0
    # every thread of the pools is idle: a new call runs at once and in order
    assert [r.unit for r in proc.process_units([4, 5])] == [4, 5]
    assert not any(t.name.startswith(("read", "write")) and t.is_alive() and _busy(t) for t in threading.enumerate())


def _busy(thread: threading.Thread) -> bool:
    import sys

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:  # an idle pool thread waits in its work queue's get()
        if frame.f_code.co_name == "_worker":
            return False
        frame = frame.f_back
    return True
