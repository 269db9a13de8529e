"""Ground-truth masks flow from the data into the store (issue: ground truth): a Parquet mask
column is decoded, resized and cropped exactly as its image, and stored as ``ground_truth/mask``."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from distributed_attr.config import ConfigError, load_config
from distributed_attr.io.sources import SourceError
from distributed_attr.io.store import SCHEMA_VERSION, Keys
from distributed_attr.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Images whose pixels *are* their masks (white inside, black outside), 40 x 56 px so that the
    job resizes and centre-crops them; a mask that does not decode on image 3."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(12):
        m = np.zeros((40, 56), dtype=np.uint8)
        top, left = rng.integers(0, 24), rng.integers(0, 36)
        m[top:top + 14, left:left + 18] = 255
        images.append({"bytes": png(m), "path": f"{i}.png"})
        masks.append({"bytes": png(m) if i != 3 else b"\x89PNG broken", "path": f"{i}-mask.png"})
    d = tmp_path_factory.mktemp("gt")
    pq.write_table(pa.table({"image": images, "label": [i % 10 for i in range(12)], "mask": masks}), d / "s.parquet")
    return d / "s.parquet"


def job(make_config, data, store, **data_over):
    cfg = make_config(data, store, unit_size=5, batch_size=4)
    cfg["methods"] = {"saliency": {}}
    cfg["data"].update(data_over)
    return cfg


def test_masks_are_stored_aligned_with_their_images(tmp_path, shapes, make_config):
    summary = run(job(make_config, shapes, tmp_path / "s.zarr", mask_column="mask"), progress=False)
    assert list(summary.failures) == [3]
    assert summary.failures[3].startswith("ValueError: ground-truth mask (data.mask_column 'mask'): Unidentified")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g.attrs["schema_version"] == SCHEMA_VERSION == "1.3"
    stored = g[Keys.GROUND_TRUTH_MASK][:]
    assert stored.dtype == bool and stored.shape == (12, 32, 32)
    # the oracle: the image went through the same resize and crop, and it is its own mask
    from distributed_attr.config import DataConfig
    from distributed_attr.io.sources import decode_image

    data = DataConfig(path=str(shapes), image_size=32, channels=1, mean=[0.0], std=[1.0])
    table = pq.read_table(shapes)
    for i in range(12):
        if i == 3:
            assert not stored[3].any() and not g["ok"][3]
            continue
        expected = decode_image(table.column("image")[i].as_py()["bytes"], data)[0].numpy() >= 0.5
        np.testing.assert_array_equal(stored[i], expected, err_msg=str(i))
        assert 0 < stored[i].sum() < 32 * 32


def test_without_a_mask_column_the_store_has_no_mask_array(tmp_path, shapes, make_config):
    run(job(make_config, shapes, tmp_path / "s.zarr"), progress=False)
    assert Keys.GROUND_TRUTH_MASK not in zarr.open_group(str(tmp_path / "s.zarr"), mode="r")


def test_a_missing_mask_column_and_a_format_without_masks_are_named(tmp_path, shapes, make_config):
    with pytest.raises(SourceError, match=r"data.mask_column 'gt' is not a column .*columns: \['image', 'label', 'mask'\]"):
        run(job(make_config, shapes, tmp_path / "s.zarr", mask_column="gt"), progress=False)
    assert not (tmp_path / "s.zarr").exists()
    cfg = job(make_config, shapes, tmp_path / "t.zarr", mask_column="mask", format="folder")
    with pytest.raises(ConfigError, match="mask_column is read from Parquet data only"):
        load_config(cfg)


def test_localisation_and_robustness_metrics_run_in_the_job_on_the_stored_masks(tmp_path, shapes, make_config):
    """The job's metric arrays equal the metrics evaluated (from Python) on what the store holds:
    its float32 maps and its masks; the maths itself is checked against Quantus elsewhere."""
    import torch

    from distributed_attr import zoo
    from distributed_attr.config import DataConfig
    from distributed_attr.io.sources import decode_image
    from distributed_attr.metrics import evaluate

    cfg = job(make_config, shapes, tmp_path / "s.zarr", mask_column="mask")
    cfg["run"]["map_dtype"] = "float32"
    cfg["filters"] = {"sweep": [100], "store_maps": [100]}
    cfg["metrics"] = {"relevance_rank_accuracy": {}, "pointing_game": {}, "max_sensitivity": {"samples": 3}}
    run(cfg, progress=False)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    ok = g["ok"][:]
    masks = torch.from_numpy(g[Keys.GROUND_TRUTH_MASK][:][ok])
    maps = torch.from_numpy(g["maps/saliency"][:][ok])
    for metric, output in (("relevance_rank_accuracy", "accuracy"), ("pointing_game", "hit")):
        stored = g[Keys.metric(metric, output, "saliency")][:]
        assert np.isnan(stored[~ok]).all()
        expected = evaluate(None, torch.zeros(len(maps), 1, 32, 32), maps, metric, masks=masks)[output]
        np.testing.assert_allclose(stored[ok, 0], expected.numpy(), rtol=1e-6, err_msg=metric)
    sens = g[Keys.metric("max_sensitivity", "sensitivity", "saliency")][:]
    assert np.isfinite(sens[ok]).all() and (sens[ok] >= 0).all() and sens.shape == (12, 2)
    # the raw map's sensitivity, recomputed from Python with the stored images and targets
    data = DataConfig(path=str(shapes), image_size=32, channels=1, mean=[0.0], std=[1.0])
    table = pq.read_table(shapes)
    x = torch.stack([decode_image(table.column("image")[i].as_py()["bytes"], data) for i in np.flatnonzero(ok)])
    model, _ = zoo.pretrained("digits_cnn")
    from distributed_attr import attribute

    expected = evaluate(model, x, maps, "max_sensitivity", torch.from_numpy(g["target"][:][ok]),
                        indices=torch.from_numpy(np.flatnonzero(ok)), samples=3,
                        explain=lambda xs, t: attribute(model, xs, "saliency", t))["sensitivity"]
    np.testing.assert_allclose(sens[ok, 0], expected.numpy(), rtol=1e-4)


def test_a_localisation_metric_without_masks_is_refused_before_the_store_exists(tmp_path, shapes, make_config):
    from distributed_attr.runner import JobError

    cfg = job(make_config, shapes, tmp_path / "s.zarr")
    cfg["metrics"] = {"pointing_game": {}}
    with pytest.raises(JobError, match=r"metrics \['pointing_game'\] compare maps with ground-truth masks.*data.mask_column"):
        run(cfg, progress=False)
    assert not (tmp_path / "s.zarr").exists()
