"""The aggregation job against NumPy on a small synthetic store: in-process and on local Ray."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from distributed_attr.aggregate import run_aggregation
from distributed_attr.aggregate.job import plan_groups
from distributed_attr.aggregate.synthetic import write_synthetic_store
from distributed_attr.spectral import radial_bin_counts

UNIT = 16
DONE = [0, 1, 3, 4]  # unit 2 unfinished: its images must not count (so: ``partial=True``)
FAILED = [3, 20, 40, 66]  # ok=False (40 is in the unfinished unit anyway)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("agg") / "synthetic.zarr"
    return write_synthetic_store(path, n_images=70, unit_size=UNIT, height=16, width=20,
                                 methods=("saliency", "integrated_gradients"), n_classes=4,
                                 done_units=DONE, failed=FAILED, sweep=(224, 100, 30, 7))


def _expected(store):
    """Every number the job reports, recomputed from the raw arrays with NumPy in float64."""
    g = zarr.open_group(store, mode="r")
    unit_of = np.arange(g.attrs["n_images"]) // UNIT
    keep = g["ok"][:] & np.isin(unit_of, np.flatnonzero(g["units/done"][:] == 1))
    target = g["target"][:][keep]
    freqs = g["spectra/frequency"][:]
    counts = radial_bin_counts(16, 20)
    hf_cut = g.attrs["config"]["spectra"]["hf_cutoff"]
    out = {"n": int(keep.sum())}
    for m in g.attrs["methods"]:
        spec = g[f"spectra/{m}"][:][keep].astype(np.float64)  # (n, K, F)
        maps = g[f"maps/{m}"][:][keep].astype(np.float64)
        per = {}
        for scope, sel in [("all", np.ones(len(target), bool))] + [(int(c), target == c) for c in np.unique(target)]:
            s = spec[sel]
            mean = s.mean(0)
            std = s.std(0, ddof=1)
            pos = freqs > 0
            # documented definitions: the fit skips bins at or below 1e-10 x the largest bin
            # (rounding left by the filter); a map whose non-DC energy is at most 1e-10 of its
            # energy is constant and has no high-frequency share
            slopes = []
            for k in range(mean.shape[0]):
                use = pos & (mean[k] > 1e-10 * mean[k].max())
                slopes.append(np.polyfit(np.log10(freqs[use]), np.log10(mean[k, use]), 1)[0] if use.sum() >= 2 else np.nan)

            def hf_share(p):
                energy = p * counts
                high, ac, total = energy[..., freqs > hf_cut].sum(-1), energy[..., pos].sum(-1), energy.sum(-1)
                return np.where(ac <= 1e-10 * total, 0.0, high / np.where(ac > 0, ac, 1.0))

            hf = hf_share(mean)
            per_image_hf = hf_share(s)
            per[scope] = dict(n=int(sel.sum()), mean=mean, std=std, ci95=1.96 * std / np.sqrt(sel.sum()),
                              slope=np.array(slopes), hf=hf, image_hf=per_image_hf.mean(0),
                              stored_hf=g[f"hf_fraction/{m}"][:][keep][sel].astype(np.float64).mean(0),
                              map_mean=maps[sel].mean(0))
        out[m] = per
    return out


def _check(result, store, expected, out_dir):
    assert result["images"] == expected["n"] == 70 - 16 - 3
    assert result["units"] == len(DONE)
    agg = zarr.open_group(store, mode="r")["aggregates"]
    summary = pq.read_table(result["tables"]["summary"]).to_pandas()
    spectra = pq.read_table(result["tables"]["spectra"]).to_pandas()
    cutoffs = agg["cutoff"][:]
    assert math.isinf(cutoffs[0]) and len(cutoffs) == 5
    for m in ("saliency", "integrated_gradients"):
        e = expected[m]["all"]
        a = agg[m]
        np.testing.assert_allclose(a["spectrum_mean"][:], e["mean"], rtol=1e-6)
        np.testing.assert_allclose(a["spectrum_std"][:], e["std"], rtol=1e-6)
        np.testing.assert_allclose(a["spectrum_ci95"][:], e["ci95"], rtol=1e-6)
        np.testing.assert_allclose(a["slope"][:], e["slope"], rtol=1e-6)
        assert np.isfinite(e["slope"][:-1]).all()
        np.testing.assert_allclose(a["hf_fraction"][:], e["hf"], rtol=1e-6)
        np.testing.assert_allclose(a["image_hf_fraction_mean"][:], e["image_hf"], rtol=1e-6)
        np.testing.assert_allclose(a["stored_hf_fraction_mean"][:], e["stored_hf"], rtol=1e-5)
        np.testing.assert_allclose(a["map_mean"][:], e["map_mean"], rtol=1e-5, atol=1e-6)
        assert int(a["n_images"][...]) == e["n"]
        classes = a["class"][:].tolist()
        assert classes == sorted(k for k in expected[m] if k != "all")
        for i, c in enumerate(classes):
            ec = expected[m][c]
            np.testing.assert_allclose(a["class_spectrum_mean"][i], ec["mean"], rtol=1e-6)
            if ec["n"] > 1:
                np.testing.assert_allclose(a["class_spectrum_ci95"][i], ec["ci95"], rtol=1e-6)
            np.testing.assert_allclose(a["class_slope"][i], ec["slope"], rtol=1e-6, equal_nan=True)
            assert int(a["class_n_images"][i]) == ec["n"]
        # the tables say the same
        rows = summary[(summary.method == m) & (summary.scope == "all")].sort_values("cutoff", ascending=False)
        np.testing.assert_allclose(rows.slope.to_numpy(), e["slope"][np.argsort(-cutoffs)], rtol=1e-6)
        sel = spectra[(spectra.method == m) & (spectra.scope == "all") & np.isinf(spectra.cutoff)]
        np.testing.assert_allclose(sel["mean"].to_numpy(), e["mean"][0], rtol=1e-6)
        np.testing.assert_allclose((sel.upper - sel.lower).to_numpy(), 2 * e["ci95"][0], rtol=1e-6)
        c0 = classes[0]
        sel = spectra[(spectra.method == m) & (spectra["class"] == c0) & np.isinf(spectra.cutoff)]
        np.testing.assert_allclose(sel["mean"].to_numpy(), expected[m][c0]["mean"][0], rtol=1e-6)
    for p in result["plots"]:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["out_dir"] == str(out_dir)


def test_in_process_aggregation_equals_numpy(store, tmp_path):
    expected = _expected(store)
    result = run_aggregation(store, num_workers=0, out_dir=str(tmp_path / "out"), partial=True)
    _check(result, store, expected, tmp_path / "out")
    assert result["spectra_source"] == "store"
    assert result["partial"] is True and (result["units_done"], result["n_units"]) == (len(DONE), 5)


def test_ray_aggregation_equals_numpy(store, tmp_path):
    ray = pytest.importorskip("ray")
    expected = _expected(store)
    # address="local": a fresh local instance even if RAY_ADDRESS or a `ray start` cluster is around
    ray.init(address="local", num_cpus=2, object_store_memory=100_000_000, include_dashboard=False,
             configure_logging=False)
    try:
        # one unit per task: 4 tasks over 2 workers, merged in completion order
        result = run_aggregation(store, num_workers=2, out_dir=str(tmp_path / "ray-out"), units_per_task=1,
                                 partial=True)
        assert ray.is_initialized()  # a Ray it did not start is left running
    finally:
        ray.shutdown()
    assert result["workers"] == 2
    _check(result, store, expected, tmp_path / "ray-out")


def test_default_out_dir_and_spectra_from_maps(tmp_path):
    """A store without spectra: the readers compute them from the maps; the numbers equal those
    of the same store written with spectra (computed from the same rounded maps)."""
    kw = dict(n_images=24, unit_size=8, height=12, methods=("saliency",), n_classes=2, sweep=(100, 15))
    with_spec = write_synthetic_store(tmp_path / "a.zarr", **kw)
    without = write_synthetic_store(tmp_path / "b.zarr", with_spectra=False, **kw)
    ra = run_aggregation(with_spec, num_workers=0, out_dir=str(tmp_path / "a-out"))
    rb = run_aggregation(without, num_workers=0)
    assert rb["out_dir"] == str(tmp_path / "b-outputs") and rb["spectra_source"] == "computed from maps"
    ga = zarr.open_group(with_spec, mode="r")["aggregates/saliency"]
    gb = zarr.open_group(without, mode="r")["aggregates/saliency"]
    np.testing.assert_allclose(gb["spectrum_mean"][:], ga["spectrum_mean"][:], rtol=1e-5)
    assert ra["summary"]["saliency"]["n_images"] == rb["summary"]["saliency"]["n_images"] == 24


def test_plan_groups_are_contiguous_and_cover_everything():
    groups = plan_groups([5, 0, 1, 2, 7, 8, 9], 3)
    assert [u for g in groups for u in g] == [0, 1, 2, 5, 7, 8, 9]
    assert len(groups) == 3 and max(map(len, groups)) - min(map(len, groups)) <= 1
    assert plan_groups([1, 2], 8) == [[1], [2]]


def test_missing_store_and_non_store_errors(tmp_path):
    from distributed_attr.io.store import StoreError

    with pytest.raises(StoreError, match="no attribution store at .*nope.zarr.*: it is missing"):
        run_aggregation(str(tmp_path / "nope.zarr"), num_workers=0)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="is a folder that is not an attribution store"):
        run_aggregation(str(tmp_path / "plain.zarr"), num_workers=0)


def test_read_paths_and_threads_give_identical_states(store):
    """The fast shard reader, zarr's reader, one thread or several, blocks of one unit (buffers
    reused every other block) or of several: the very same partial states, bit for bit."""
    import dataclasses

    from distributed_attr.aggregate.plan import make_plan
    from distributed_attr.aggregate.reader import BlockReader, aggregate_units

    root = zarr.open_group(store, mode="r")
    plan = make_plan(store, root, read_maps=True)
    arrays = {n: root[n] for n in ("ok", "target", "maps/saliency", "spectra/saliency", "hf_fraction/saliency")}
    reader = BlockReader(plan, arrays, 1, threads=1)
    assert sorted(reader.readers) == sorted(arrays)  # the synthetic store is in our layout: all fast
    reader.close()

    def states(**kw):
        part = aggregate_units(dataclasses.replace(plan, **kw), DONE)
        assert part.images == 70 - 16 - 3 and part.units == len(DONE)
        return {(m, q, k): r for m, per_q in part.stats.items() for q, g in per_q.items()
                for k, r in g.compute().items()}

    reference = states(threads=1, fast_reads=False)
    for kw in (dict(threads=1), dict(threads=2, read_bytes=1), dict(threads=3), dict(threads=2, fast_reads=False)):
        got = states(**kw)
        assert got.keys() == reference.keys()
        for key, r in reference.items():
            for a, b in zip(r, got[key]):
                np.testing.assert_array_equal(a, b, err_msg=f"{kw} {key}")


def test_threads_must_be_positive(store, tmp_path):
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        run_aggregation(store, num_workers=0, out_dir=str(tmp_path), threads=0)


def test_local_ray_gets_the_cpus_the_tasks_ask_for():
    """A local Ray started by the job has this machine's CPUs, or workers x threads when more
    was asked for, so the tasks asked for run side by side."""
    import os

    from distributed_attr.aggregate.schedule import local_cpus

    assert local_cpus(1, 2) == max(os.cpu_count(), 2)
    assert local_cpus(8, 2) == max(os.cpu_count(), 16)
    assert local_cpus(None, 2) == os.cpu_count()


def test_class_maps_only_up_to_a_number_of_classes(store, tmp_path):
    """Per-class mean maps cost a map per class in every task's state: above ``class_maps``
    classes only the overall mean/std map is kept (and is still exact); spectra stay per class."""
    expected = _expected(store)
    result = run_aggregation(store, num_workers=0, out_dir=str(tmp_path / "o"), plots=False, class_maps=3,
                             partial=True)
    assert result["class_maps"] is False  # the store's maps explain 4 classes
    a = zarr.open_group(store, mode="r")["aggregates/saliency"]
    assert "class_map_mean" not in a and "class_spectrum_mean" in a
    np.testing.assert_allclose(a["map_mean"][:], expected["saliency"]["all"]["map_mean"], rtol=1e-5, atol=1e-6)
    result = run_aggregation(store, num_workers=0, out_dir=str(tmp_path / "o"), plots=False, class_maps=4,
                             partial=True)
    assert result["class_maps"] is True
    a = zarr.open_group(store, mode="r")["aggregates/saliency"]
    classes = a["class"][:].tolist()
    np.testing.assert_allclose(a["class_map_mean"][classes.index(1)], expected["saliency"][1]["map_mean"],
                               rtol=1e-5, atol=1e-6)
