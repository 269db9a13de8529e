"""Data-loss and corruption cases a hostile but fair user hits (issue: never lose data).

Each test reproduces one reported failure (they fail on the code before the fix) and checks the
fixed behaviour: nothing outside a store is deleted, one driver per store, damaged shards are
found, reported and recomputed, a changed dataset blocks a resume, and bad inputs are refused
before the store exists. In-process (``num_workers: 0``); the Ray faults are in test_faults.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
import zarr

from distributed_attr.cli import main
from distributed_attr.io.lease import LEASE_NAME, StoreLease, lease_info
from distributed_attr.io.store import AttributionStore, StoreError
from conftest import read_arrays, saliency_only  # noqa: E402
from distributed_attr.runner import JobError, run

pytestmark = pytest.mark.usefixtures("one_thread")




def assert_same(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- 1. --overwrite never deletes what is not a store ----------------------------------------------

def test_overwrite_refuses_a_folder_that_is_not_a_store_and_keeps_every_file(tmp_path, parquet_dir, make_config,
                                                                           capsys):
    notes = tmp_path / "thesis"
    notes.mkdir()
    (notes / "chapter1.tex").write_text("months of work")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(saliency_only(parquet_dir, notes)))
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["run", str(tmp_path / "job.yaml"), "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert "not an attribution store" in err and "--overwrite" not in err, err
    assert os.listdir(notes) == ["chapter1.tex"]
    assert (notes / "chapter1.tex").read_text() == "months of work"


def test_store_dot_next_to_the_config_and_data_is_refused_outright(tmp_path, parquet_dir, make_config, capsys):
    project = tmp_path / "project"
    shutil.copytree(parquet_dir, project / "data")
    (project / "notes.txt").write_text("keep me")
    cfg = saliency_only("data", ".")
    (project / "job.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    assert main(["run", str(project / "job.yaml"), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "refusing to write there" in err
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before


@pytest.mark.parametrize("where", ["data folder", "folder above the data"])
def test_a_store_that_holds_the_data_is_refused(tmp_path, parquet_dir, make_config, where):
    data = tmp_path / "ds" / "shards"
    shutil.copytree(parquet_dir, data)
    store = data if where == "data folder" else tmp_path / "ds"
    with pytest.raises(StoreError, match="holds data.path"):
        run(saliency_only(data, store), overwrite=True, progress=False)
    assert len(list(data.glob("*.parquet"))) == 3


def test_overwrite_replaces_a_store_but_keeps_files_that_are_not_part_of_it(tmp_path, parquet_dir, make_config,
                                                                          reference):
    store = tmp_path / "s.zarr"
    cfg = saliency_only(parquet_dir, store)
    run(cfg, progress=False)
    (store / "README-mine.txt").write_text("a note I left in the store folder")
    s = run(cfg, overwrite=True, progress=False)
    assert s.units_done == 6
    assert (store / "README-mine.txt").read_text() == "a note I left in the store folder"
    assert_same(reference, read_arrays(store))


def test_an_interrupted_creation_is_still_recognised_and_replaceable(tmp_path, parquet_dir, make_config):
    store = tmp_path / "s.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    g.attrs.update(producer="distributed_attr", schema_version="1.1")  # what creation writes first
    with pytest.raises(StoreError, match="not fully created"):
        AttributionStore.open(store)  # no reader takes it for a store
    # nothing of it was finished: the rerun replaces it, with --resume or --overwrite or neither
    assert run(saliency_only(parquet_dir, store), resume=True, progress=False).units_done == 6


# -- 8. one driver per store -----------------------------------------------------------------------

def test_a_second_driver_is_refused_while_the_first_holds_the_store(tmp_path, parquet_dir, make_config, reference):
    store = tmp_path / "s.zarr"
    cfg = saliency_only(parquet_dir, store)
    run(cfg, progress=False)
    # Another driver, alive (this very process's pid on this host), holds the store.
    other = StoreLease.acquire(store)
    try:
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(StoreError, match="in use by another driver pid"):
                run(cfg, progress=False, **kwargs)
        assert_same(reference, read_arrays(store))  # --overwrite deleted nothing
    finally:
        other.release()
    assert lease_info(store) is None


def test_the_lease_of_a_killed_driver_is_taken_over_at_once_and_an_expired_one_after_its_ttl(tmp_path):
    store = tmp_path / "s.zarr"
    # A driver process that took the lease and was SIGKILLed: its pid is gone.
    code = ("import sys, os, signal; from distributed_attr.io.lease import StoreLease; "
            "StoreLease.acquire(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(store)], check=False, timeout=60)
    dead = lease_info(store)
    assert dead is not None and not dead.alive()
    mine = StoreLease.acquire(store)
    assert lease_info(store).owner == mine.info.owner
    # An expired heartbeat (a driver on another host that stopped beating) is taken over too.
    mine.info = type(mine.info)(**{**mine.info.__dict__, "host": "elsewhere", "heartbeat": 0.0})
    (store / LEASE_NAME / "zarr.json").write_text(mine.info.metadata())
    again = StoreLease.acquire(store)
    assert lease_info(store).owner == again.info.owner != mine.info.owner
    # ... and the driver that lost it notices at its next heartbeat.
    mine.heartbeat()
    with pytest.raises(Exception, match="took the store over"):
        mine.check()
    again.release()


def test_work_between_taking_the_lease_and_the_heartbeat_is_not_taken_for_failed_refreshes(tmp_path):
    """Before, the first refresh came ttl/4 after the heartbeat started: a driver that spent 80% of
    the ttl between taking the lease and starting it (clearing or checking a large store) stopped at
    its first commit although its lease was alive and no refresh had failed."""
    import time

    lease = StoreLease.acquire(tmp_path / "s", ttl=2.0)
    try:
        time.sleep(1.7)  # > 0.8 x ttl: "at risk" by the stamp of the first heartbeat
        lease.start_heartbeat()
        lease.check()  # a commit right away: no refresh has failed, the lease is ours
        deadline = time.monotonic() + 10
        while lease.info.age() > 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        lease.check()  # refreshed at once, not ttl/4 later
        assert lease.info.age() < 1.0 and lease_info(str(tmp_path / "s")).alive()
    finally:
        lease.release()


def test_the_lease_is_a_zarr_group_that_xarray_and_zarr_ignore_quietly(tmp_path, parquet_dir, make_config):
    import warnings

    store = tmp_path / "s.zarr"
    run(saliency_only(parquet_dir, store), progress=False)
    lease = StoreLease.acquire(store)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # zarr warns about objects that are not Zarr nodes
            g = zarr.open_group(str(store), mode="r")
            assert dict(g[LEASE_NAME].attrs)["pid"] == os.getpid()
            names = [n for n, _ in g.members()]
        assert LEASE_NAME in names
    finally:
        lease.release()


# -- 3. corruption is detected, reported, recomputed and never averaged over ----------------------

def _shard_file(store, name, unit):
    g = zarr.open_group(str(store), mode="r")
    arr = g[name]
    return store / name / arr.metadata.encode_chunk_key((unit,) + (0,) * (arr.ndim - 1))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_shard_is_reported_refused_by_readers_and_recomputed_by_resume(tmp_path, parquet_dir, make_config,
                                                                                reference, capsys, damage):
    store = tmp_path / "s.zarr"
    cfg = saliency_only(parquet_dir, store)
    cfg["metrics"] = {}
    run(cfg, progress=False)
    shard = _shard_file(store, "maps/saliency", 2)
    if damage == "deleted":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    # Readers refuse: no aggregate over 80 of 96 images while the store says 96.
    assert main(["aggregate", str(store), "--workers", "0", "--out", str(tmp_path / "agg")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unit 2" in err and "inspect --verify" in err, err
    # inspect says "complete" until it reads the shards back; --verify finds and marks the unit.
    assert main(["inspect", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "1 unit(s) damaged" in out and "unit 2: maps/saliency" in out, out
    assert main(["inspect", str(store)]) == 0
    assert "5/6 units" in capsys.readouterr().out
    # --resume recomputes exactly that unit; the store equals a fault-free one.
    s = run(cfg, resume=True, progress=False)
    assert s.units_this_run == 1 and s.units_done == 6
    assert_same(reference, read_arrays(store))
    assert main(["inspect", str(store), "--verify"]) == 0
    assert main(["aggregate", str(store), "--workers", "0", "--out", str(tmp_path / "agg")]) == 0


def test_resume_alone_finds_a_deleted_shard(tmp_path, parquet_dir, make_config, reference, capsys):
    store = tmp_path / "s.zarr"
    cfg = saliency_only(parquet_dir, store)
    run(cfg, progress=False)
    _shard_file(store, "ok", 4).unlink()
    s = run(cfg, resume=True, progress=False)
    assert s.units_this_run == 1
    assert "unit 4: ok: shard" in capsys.readouterr().err
    assert_same(reference, read_arrays(store))


def test_nan_maps_of_ok_images_are_refused_by_the_aggregate(tmp_path, parquet_dir, make_config):
    store = tmp_path / "s.zarr"
    run(saliency_only(parquet_dir, store), progress=False)
    g = zarr.open_group(str(store), mode="r+")
    m = g["maps/saliency"]
    block = m[0:16]
    block[3] = np.nan  # an ok image whose map is gone: averaging over the rest would hide it
    m[0:16] = block
    # recorded as the worker that wrote it would have (an altered shard is refused by its checksum)
    from distributed_attr.io.store import block_checksum

    checksum = g["units/checksum"]
    checksum[0, checksum.attrs["arrays"].index("maps/saliency")] = block_checksum(block)
    with pytest.raises(StoreError, match="1 of 96 usable images have no finite"):
        from distributed_attr.aggregate import run_aggregation

        run_aggregation(str(store), num_workers=0, out_dir=str(tmp_path / "agg"), plots=False)


# -- 4. resume never mixes datasets ----------------------------------------------------------------

def test_a_parquet_file_replaced_by_another_with_the_same_row_count_blocks_resume(tmp_path, parquet_dir,
                                                                                  make_config):
    data = tmp_path / "data"
    shutil.copytree(parquet_dir, data)
    store = tmp_path / "s.zarr"
    cfg = saliency_only(data, store)
    run(cfg, progress=False)
    victim = sorted(data.glob("*.parquet"))[1]
    table = pq.read_table(victim)
    labels = table.column("label").to_numpy()
    table = table.set_column(table.schema.get_field_index("label"), "label",
                             __import__("pyarrow").array((labels + 1) % 10))
    pq.write_table(table, victim)
    assert pq.ParquetFile(victim).metadata.num_rows == table.num_rows  # same count: today's only check
    with pytest.raises(StoreError, match=rf"file '{victim.name}' changed"):
        run(cfg, resume=True, progress=False)


def test_every_image_records_where_it_came_from(tmp_path, parquet_dir, make_config):
    store = tmp_path / "s.zarr"
    run(saliency_only(parquet_dir, store), progress=False)
    keys = zarr.open_group(str(store), mode="r")["source_key"][:]
    files = sorted(p.name for p in parquet_dir.glob("*.parquet"))
    counts = [pq.ParquetFile(parquet_dir / f).metadata.num_rows for f in files]
    expected = [f"{f}:{row}" for f, n in zip(files, counts) for row in range(n)]
    assert keys.tolist() == expected
    # joined back to the images: the key's row holds the image's label
    f, row = keys[40].rsplit(":", 1)
    assert pq.read_table(parquet_dir / f).column("label")[int(row)].as_py() == \
        zarr.open_group(str(store), mode="r")["label"][40]


def test_a_moved_store_resumes(tmp_path, parquet_dir, make_config, reference):
    store = tmp_path / "a.zarr"
    cfg = saliency_only(parquet_dir, store)
    run(cfg, progress=False, _after_commit=lambda u: (_ for _ in ()).throw(KeyboardInterrupt) if u == 2 else None)
    moved = tmp_path / "elsewhere" / "b.zarr"
    moved.parent.mkdir()
    shutil.move(str(store), str(moved))
    s = run(saliency_only(parquet_dir, moved), resume=True, progress=False)
    assert s.units_this_run == 3 and s.units_done == 6
    assert_same(reference, read_arrays(moved))


# -- 7. checks up front, before the store exists ---------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"run": {"target": 10}}, r"run.target: class 10 is out of range; the model has 10 classes"),
    ({"data": {"channels": 3, "mean": [0.0], "std": [1.0]}}, r"the model cannot take this data \(data.channels=3"),
])
def test_inputs_that_cannot_work_are_refused_before_the_store_exists(tmp_path, parquet_dir, make_config, change,
                                                                    message):
    cfg = saliency_only(parquet_dir, tmp_path / "s.zarr")
    for section, values in change.items():
        cfg[section].update(values)
    with pytest.raises(JobError, match=message):
        run(cfg, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_labels_outside_the_models_classes_are_refused_with_target_label(tmp_path, parquet_dir, make_config):
    data = tmp_path / "data"
    shutil.copytree(parquet_dir, data)
    f = sorted(data.glob("*.parquet"))[0]
    table = pq.read_table(f)
    labels = table.column("label").to_numpy().copy()
    labels[3] = 17
    table = table.set_column(table.schema.get_field_index("label"), "label", __import__("pyarrow").array(labels))
    pq.write_table(table, f)
    cfg = saliency_only(data, tmp_path / "s.zarr", target="label")
    with pytest.raises(JobError, match=r"1 label\(s\) are not classes of the model \(0..9\), e.g. \[17\]"):
        run(cfg, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def test_an_error_in_a_unit_without_ray_is_one_error_line(tmp_path, parquet_dir, make_config, capsys, monkeypatch):
    from distributed_attr.pipeline import UnitProcessor

    def broken(self, x, labels, indices, masks=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(UnitProcessor, "compute_batch", broken)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(saliency_only(parquet_dir, tmp_path / "s.zarr")))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unit 0 failed: RuntimeError: CUDA error") and "Traceback" not in err
