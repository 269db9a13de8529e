import numpy as np
import pytest
import torch

from distributed_attr.config import DataConfig
from distributed_attr.data import write_image_folder, write_parquet_shards, write_webdataset
from distributed_attr.io.sources import SourceError, decode_image, open_source


def _cfg(fmt, path, **kw):
    return DataConfig(format=fmt, path=str(path), image_size=32, channels=1, mean=[0.0], std=[1.0], **kw)


def _decoded(src, cfg, start, stop):
    recs = list(src.read(start, stop))
    return [r.index for r in recs], [r.label for r in recs], torch.stack([decode_image(r.payload, cfg) for r in recs])


def test_all_formats_give_the_same_images_labels_and_indices(tmp_path, digits_small):
    images, labels = digits_small
    images, labels = images[:30], labels[:30]
    write_parquet_shards(tmp_path / "pq", images, labels, shards=3, row_group_size=4)
    write_webdataset(tmp_path / "wds", images, labels, shards=2)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    expected = torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1)
    for fmt, path, kw in [("parquet", tmp_path / "pq", {}), ("webdataset", tmp_path / "wds", {}),
                          ("numpy", tmp_path / "x.npy", {"labels_path": str(tmp_path / "y.npy")})]:
        cfg = _cfg(fmt, path, **kw)
        src = open_source(cfg)
        assert len(src) == 30, fmt
        # a range that crosses file (and row-group) boundaries
        idx, lab, x = _decoded(src, cfg, 7, 23)
        assert idx == list(range(7, 23)), fmt
        assert lab == labels[7:23].tolist(), fmt
        torch.testing.assert_close(x, expected[7:23], atol=1 / 255 + 1e-6, rtol=0)


def test_image_folder_labels_follow_sorted_class_folders(tmp_path, digits_small):
    images, labels = digits_small
    write_image_folder(tmp_path / "f", images[:20], labels[:20])
    src = open_source(_cfg("folder", tmp_path / "f"))
    recs = list(src.read(0, len(src)))
    assert len(recs) == 20
    classes = sorted(f"class_{d}" for d in set(labels[:20].tolist()))
    assert [r.index for r in recs] == list(range(20))
    for r in recs:  # label = position of the class folder among the sorted folders (ImageFolder)
        assert r.name.split("/")[-2] == classes[r.label]
    assert sorted(r.label for r in recs) == sorted(classes.index(f"class_{d}") for d in labels[:20])


def test_decode_resizes_crops_and_normalises():
    cfg = DataConfig(format="numpy", path="unused", image_size=16, channels=3, mean=[0.5], std=[0.25])
    img = np.full((20, 40), 255, dtype=np.uint8)
    x = decode_image(img, cfg)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, torch.full((3, 16, 16), 2.0))


def test_corrupt_bytes_raise_with_a_reason():
    cfg = DataConfig(format="parquet", path="unused", image_size=32, channels=1, mean=[0.0], std=[1.0])
    with pytest.raises(Exception, match="cannot identify image"):
        decode_image(b"not an image at all", cfg)


def test_missing_path_and_column_are_named(tmp_path, digits_small):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(_cfg("parquet", tmp_path / "nope"))
    write_parquet_shards(tmp_path / "pq", *[a[:4] for a in digits_small], shards=1)
    with pytest.raises(SourceError, match=r"data.image_column 'img' is not a column.*columns: \['image', 'label'\]"):
        open_source(_cfg("parquet", tmp_path / "pq", image_column="img"))
