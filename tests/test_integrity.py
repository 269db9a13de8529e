"""Every unit that is done is complete, and a shard's content is tied to its unit (issue 20,
items 1 and 7). In-process jobs (``num_workers: 0``) on real files: a folder of PNGs with a
zero-byte image, and shard files swapped on disk."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from distributed_attr.cli import main
from distributed_attr.runner import run
from conftest import saliency_only  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# -- 1. a unit whose images all (or partly) fail writes every array ---------------------------------

def _folder_job(tmp_path, digits_small, class_1: dict[str, bool]) -> dict:
    """8 good PNGs in ``class_0/``, then ``class_1/`` with ``{name: good}`` images (a bad one is a
    zero-byte file); ``unit_size: 8``, so unit 1 holds the images of ``class_1`` alone."""
    from distributed_attr.data import _png

    images, _ = digits_small
    data = tmp_path / "data"
    for d in ("class_0", "class_1"):
        (data / d).mkdir(parents=True)
    for i in range(8):
        (data / "class_0" / f"{i:03d}.png").write_bytes(_png(images[i]))
    for j, (name, good) in enumerate(class_1.items()):
        (data / "class_1" / name).write_bytes(_png(images[8 + j]) if good else b"")
    cfg = saliency_only(data, tmp_path / "s.zarr", unit_size=8)
    cfg["data"]["format"] = "folder"
    # every kind of per-image array: maps, filtered maps, spectra, high-frequency fractions, a metric
    cfg["spectra"] = {"enabled": True}
    cfg["filters"] = {"sweep": [30], "store_maps": [30]}
    cfg["metrics"] = {"sparseness": {}}
    return cfg


@pytest.mark.parametrize("class_1", [{"zzz.png": False}, {"aaa.png": True, "zzz.png": False}],
                         ids=["all images of the last unit fail", "part of the last unit fails"])
def test_a_unit_whose_images_fail_writes_every_array_and_aggregates(tmp_path, digits_small, capsys, class_1):
    cfg = _folder_job(tmp_path, digits_small, class_1)
    store = tmp_path / "s.zarr"
    summary = run(cfg, progress=False)
    n = 8 + len(class_1)
    assert summary.units_done == summary.units == 2
    assert list(summary.failures) == [n - 1] and "zzz.png" in summary.failures[n - 1]

    g = zarr.open_group(str(store), mode="r")
    per_image = _per_image_paths(g)
    assert {"maps/saliency", "filtered_maps/saliency", "spectra/saliency", "hf_fraction/saliency",
            "metrics/sparseness/gini/saliency", "target", "prediction", "probability"} <= set(per_image)
    for name in per_image:  # unit 1's shard of every per-image array is on disk
        arr = g[name]
        key = arr.metadata.encode_chunk_key((1,) + (0,) * (arr.ndim - 1))
        assert (store / name / key).is_file(), f"{name}: shard {key} of unit 1 is missing"
    ok = g["ok"][:]
    np.testing.assert_array_equal(ok, np.arange(n) != n - 1)
    np.testing.assert_array_equal(g["image"][:], np.arange(n))
    assert np.isnan(g["maps/saliency"][n - 1]).all() and np.isfinite(g["maps/saliency"][: n - 1]).all()
    assert g["target"][n - 1] == -1 and g["prediction"][n - 1] == -1 and np.isnan(g["probability"][n - 1])
    assert np.isnan(g["spectra/saliency"][n - 1]).all() and np.isnan(g["hf_fraction/saliency"][n - 1]).all()

    assert main(["inspect", str(store), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "every done unit reads back" in out and "2/2 units" in out, out
    from distributed_attr.aggregate import run_aggregation

    agg = run_aggregation(str(store), num_workers=0, out_dir=str(tmp_path / "agg"), plots=False)
    assert agg["units"] == 2 and agg["images"] == n - 1 and agg["summary"]["saliency"]["n_images"] == n - 1
    assert zarr.open_group(str(store), mode="r")["aggregates"].attrs["units_aggregated"] == 2


def _per_image_paths(g) -> list[str]:
    from distributed_attr.io.store import AttributionStore

    return AttributionStore.from_group(g, "s.zarr").per_image_arrays()


# -- 7. a shard's content is tied to its unit ---------------------------------------------------------

def _shard(store, name, unit):
    arr = zarr.open_group(str(store), mode="r")[name]
    return store / name / arr.metadata.encode_chunk_key((unit,) + (0,) * (arr.ndim - 1))


def _swap(store, name, a=0, b=1):
    """Exchange two units' shard files of one array on disk: valid data in the wrong place."""
    fa, fb = _shard(store, name, a), _shard(store, name, b)
    tmp = fa.with_name("swap.tmp")
    fa.rename(tmp)
    fb.rename(fa)
    tmp.rename(fb)


@pytest.fixture(scope="module")
def intact(tmp_path_factory, parquet_dir):
    """A store of 3 units of 16 digits (sequential stages), and its arrays."""
    path = tmp_path_factory.mktemp("intact") / "s.zarr"
    cfg = saliency_only(parquet_dir, path, decode_workers=0)
    cfg["data"]["limit"] = 48
    run(cfg, progress=False)
    g = zarr.open_group(str(path), mode="r")
    names = ["maps/saliency", "target", "label", "image"] + (["units/checksum"] if "units/checksum" in g else [])
    return cfg, path, {name: g[name][:] for name in names}


@pytest.mark.parametrize("name", ["maps/saliency", "target", "label", "image"])
def test_swapped_shards_are_found_by_verify_and_refused_by_the_aggregate(tmp_path, intact, capsys, name):
    from distributed_attr.aggregate import run_aggregation
    from distributed_attr.io.store import AttributionStore, StoreError

    _, path, _ = intact
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    assert AttributionStore.open(store, "r").verify() == {}
    _swap(store, name)
    bad = AttributionStore.open(store, "r").verify()
    assert sorted(bad) == [0, 1], bad
    if name == "image":  # caught by its range, checksums or not
        assert bad[0] == "image: holds images 16-31, not this unit's 0-15 (swapped or replaced shard?)", bad
    else:
        assert bad[0] == f"{name}: content does not match the unit's checksum (swapped or replaced shard?)", bad
    if name in ("maps/saliency", "target"):  # what the aggregate reads: refused, nothing written
        with pytest.raises(StoreError, match=rf"unit 0: {name}: content does not match the unit's checksum"):
            run_aggregation(str(store), num_workers=0, out_dir=str(tmp_path / "agg"), plots=False)
        assert "aggregates" not in zarr.open_group(str(store), mode="r")
    assert main(["inspect", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "2 unit(s) damaged" in out and f"unit 1: {name}" in out, out


def test_a_swap_is_recomputed_by_resume_with_the_same_checksums(tmp_path, intact):
    cfg, path, before = intact
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    _swap(store, "maps/saliency", 0, 2)
    assert main(["inspect", str(store), "--verify"]) == 1  # marks units 0 and 2 not done
    g = zarr.open_group(str(store), mode="r")
    assert (g["units/checksum"][0] == -1).all() and (g["units/checksum"][1] >= 0).all()
    s = run({**cfg, "store": str(store)}, resume=True, progress=False)
    assert s.units_this_run == 2
    g = zarr.open_group(str(store), mode="r")
    for name, values in before.items():  # a unit run twice writes, and records, the same bytes
        np.testing.assert_array_equal(g[name][:], values, err_msg=name)
    assert main(["inspect", str(store), "--verify"]) == 0


def test_a_store_without_checksums_still_verifies_and_its_image_range_is_checked(tmp_path, intact):
    """A store written before checksums (schema 1.2: no ``units/checksum``) opens and verifies as
    before; a swapped ``image`` shard is still found, a swapped map shard cannot be."""
    from distributed_attr.io.store import AttributionStore

    _, path, _ = intact
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    shutil.rmtree(store / "units" / "checksum", ignore_errors=True)
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["schema_version"] = "1.2"
    assert AttributionStore.open(store, "r").verify() == {}
    assert main(["inspect", str(store), "--verify"]) == 0
    _swap(store, "maps/saliency")
    assert AttributionStore.open(store, "r").verify() == {}  # not detectable without checksums
    _swap(store, "image")
    assert sorted(AttributionStore.open(store, "r").verify()) == [0, 1]


@pytest.mark.parametrize("node", ["units/checksum", "degenerate/saliency"])
def test_a_1_3_store_that_lost_its_checksums_or_flags_is_damaged_not_older(tmp_path, intact, capsys, node):
    """Before, deleting ``units/checksum`` from a 1.3 store made it read as an older one: verify
    passed a swapped shard, and the degenerate counts read "not recorded"."""
    from distributed_attr.io.store import AttributionStore, StoreError

    _, path, _ = intact
    store = tmp_path / "s.zarr"
    shutil.copytree(path, store)
    _swap(store, "maps/saliency")
    shutil.rmtree(store / node)
    with pytest.raises(StoreError, match=f"is damaged: '{node}' missing"):
        AttributionStore.open(store, "r")
    assert main(["inspect", str(store), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and node in err and "Traceback" not in err, err


def test_the_writer_fills_a_unit_without_ok_images_and_refuses_one_with_ok_images_but_missing_arrays(tmp_path):
    import math

    from distributed_attr.io.store import AttributionStore, Keys, StorePlan, UnitWriter, block_checksum

    plan = StorePlan(n_images=5, unit_size=4, image_shape=(1, 4, 4), methods=["saliency"],
                     frequencies=[0.0, 0.25, 0.5], cutoffs=[math.inf, 2.0])
    AttributionStore.create(tmp_path / "s.zarr", plan)
    writer = UnitWriter(str(tmp_path / "s.zarr"))
    facts = {Keys.IMAGE: np.arange(4, 5), Keys.LABEL: np.array([3]), Keys.SOURCE_KEY: np.array(["b/zzz.png"])}
    with pytest.raises(ValueError, match=r"unit 1: 1 image\(s\) are ok but no values were computed for .*maps/saliency"):
        writer.write(1, {**facts, Keys.OK: np.array([True])})
    checksums = writer.write(1, {**facts, Keys.OK: np.array([False])})  # the last, short unit, all failed
    assert sorted(checksums) == plan.checksummed_arrays()
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name, crc in checksums.items():
        assert block_checksum(g[name][4:5]) == crc, name
    assert np.isnan(g["maps/saliency"][4]).all() and np.isnan(g["spectra/saliency"][4]).all()
    assert g["target"][4] == -1 and g["label"][4] == 3 and g["source_key"][4] == "b/zzz.png"
