"""The job in-process (run.num_workers: 0): same code as the actors, without Ray."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from distributed_attr import attribute
from distributed_attr.config import Config
from distributed_attr.io.sources import decode_image, open_source
from distributed_attr.io.store import StoreError
from distributed_attr.runner import run


def reference_maps(cfg_dict, model):
    """A plain single-process loop over the same images: decode, predict, attribute."""
    cfg = Config.from_dict(cfg_dict)
    src = open_source(cfg.data)
    x = torch.stack([decode_image(r.payload, cfg.data) for r in src.read(0, len(src))])
    target = model(x).argmax(1)
    return {m: attribute(model, x, m, target, **p).numpy() for m, p in cfg.methods.items()}, target.numpy()


def test_store_equals_a_plain_loop_to_float16_precision(tmp_path, parquet_dir, zoo_cnn, make_config):
    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    summary = run(cfg, progress=False)
    assert summary.units_done == summary.units == 6 and not summary.failures
    ref, target = reference_maps(cfg, zoo_cnn[0])
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    np.testing.assert_array_equal(g["target"][:], target)
    np.testing.assert_array_equal(g["image"][:], np.arange(96))
    assert g["ok"][:].all()
    for m, expected in ref.items():
        stored = g[f"maps/{m}"][:]
        assert stored.dtype == np.float16
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
        # a trained model's maps: none degenerate, and the end line says so
        assert g[f"degenerate/{m}"].dtype == np.uint8 and not g[f"degenerate/{m}"][:].any(), m
    assert summary.degenerate == {m: {"maps": 96, "degenerate": 0, "all_zero": 0, "constant": 0, "non_finite": 0}
                                  for m in ref}
    assert "degenerate maps: none (0 all-zero, 0 constant, 0 non-finite of 96 per method, 2 methods)" in str(summary)
    assert not summary.warnings and g.attrs["warnings"] == []


def test_a_corrupt_image_is_recorded_and_the_rest_of_its_unit_kept(tmp_path, digits_small, make_config):
    from distributed_attr.data import _png

    images, labels = digits_small
    payloads = [{"bytes": _png(im), "path": f"{i}.png"} for i, im in enumerate(images[:40])]
    payloads[5] = {"bytes": b"\x89PNG truncated garbage", "path": "5.png"}
    pq.write_table(pa.table({"image": payloads, "label": labels[:40]}), tmp_path / "d.parquet")
    cfg = make_config(tmp_path / "d.parquet", tmp_path / "s.zarr")
    summary = run(cfg, progress=False)
    assert list(summary.failures) == [5]
    assert "5.png" in summary.failures[5] and "UnidentifiedImageError" in summary.failures[5]
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    ok = g["ok"][:]
    assert not ok[5] and ok[np.arange(40) != 5].all()
    maps = g["maps/saliency"][:]
    assert np.isnan(maps[5]).all()
    assert g["degenerate/saliency"][5] == 0  # a failed image has no flags (``ok`` says it failed)
    assert np.isfinite(maps[np.arange(40) != 5]).all()
    assert g.attrs["failures"] == {"5": summary.failures[5]}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, parquet_dir, make_config):
    full = make_config(parquet_dir, tmp_path / "full.zarr")
    run(full, progress=False)
    part = make_config(parquet_dir, tmp_path / "part.zarr")
    committed = []

    def stop_after_two(unit):
        committed.append(unit)
        if len(committed) == 2:
            raise KeyboardInterrupt

    s1 = run(part, progress=False, _after_commit=stop_after_two)
    assert s1.interrupted and s1.units_done == 2
    with pytest.raises(StoreError, match=r"exists with 2/6 units done. Pass --resume"):
        run(part, progress=False)
    s2 = run(part, progress=False, resume=True)
    assert s2.units_this_run == 4 and s2.units_done == 6
    a, b = zarr.open_group(str(tmp_path / "full.zarr"), mode="r"), zarr.open_group(str(tmp_path / "part.zarr"), mode="r")
    for name in ("maps/saliency", "maps/integrated_gradients", "target", "probability", "ok"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_resume_onto_a_different_config_is_refused_naming_the_difference(tmp_path, parquet_dir, make_config):
    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    run(cfg, progress=False)
    cfg["methods"]["integrated_gradients"]["steps"] = 8
    with pytest.raises(StoreError, match=r"methods.integrated_gradients.steps: 4 -> 8"):
        run(cfg, progress=False, resume=True)
    # speed-only settings may change on resume
    cfg["methods"]["integrated_gradients"]["steps"] = 4
    cfg["run"]["batch_size"] = 4
    assert run(cfg, progress=False, resume=True).units_this_run == 0
    s = run(dict(cfg, methods={"saliency": {}}), progress=False, overwrite=True)
    assert s.units_this_run == 6 and s.methods == ["saliency"]


def test_xarray_opens_the_store_with_named_dimensions(tmp_path, parquet_dir, make_config):
    xr = pytest.importorskip("xarray")
    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    run(cfg, progress=False)
    ds = xr.open_zarr(str(tmp_path / "s.zarr"), group="maps", consolidated=False)
    assert ds["saliency"].dims == ("image", "y", "x") and ds["saliency"].shape == (96, 32, 32)
    root = xr.open_zarr(str(tmp_path / "s.zarr"), consolidated=False)
    assert root["label"].dims == ("image",)
