"""Decoding is faithful or refuses (issue 20, items 2 and 3, and `~` in paths).

Real files throughout: 16-bit PNGs and TIFFs, JPEGs with an EXIF orientation tag, RGBA / LA /
palette PNGs, a CMYK JPEG and an RGB PNG carrying real ICC profiles (``support.icc``, written byte
by byte with a closed-form effect), a real symlink loop, real WebDataset tars. Fast, no Ray."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_attr.config import Config, ConfigError, DataConfig, diff_configs
from distributed_attr.io.sources import SourceError, decode_image, decode_mask, open_source
from support.icc import cmyk_rotated, grey_linear, linear_named_srgb, rgb_swapped_primaries


def _cfg(channels: int = 1, size: int = 16, **kw) -> DataConfig:
    """Identity normalisation and no resize for ``size``-pixel images: the decoded tensor is the
    image's pixels in [0, 1]."""
    kw = {"format": "folder", "path": "unused", **kw}
    return DataConfig(image_size=size, channels=channels, mean=[0.0] * channels, std=[1.0] * channels, **kw)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# -- bit depth ------------------------------------------------------------------------------------


def _ramp16() -> np.ndarray:
    """A 16 x 16 ramp over the whole 16-bit range (mean ~0.5)."""
    return np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)


def _as8(a16: np.ndarray) -> np.ndarray:
    return np.round(a16.astype(np.float64) / 257).astype(np.uint8)


def test_16bit_png_ramp_decodes_as_its_8bit_copy():
    a16 = _ramp16()
    png16 = _encode(Image.fromarray(a16), "PNG")
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    png8 = _encode(Image.fromarray(_as8(a16)), "PNG")
    for channels in (1, 3):
        x16, x8 = decode_image(png16, _cfg(channels)), decode_image(png8, _cfg(channels))
        torch.testing.assert_close(x16, x8, atol=1 / 255, rtol=0)  # (today: clipped, mean 0.995)
        torch.testing.assert_close(x16, torch.from_numpy(a16 / 65535.0).float().expand(channels, -1, -1))
    assert abs(float(decode_image(png16, _cfg()).mean()) - 0.5) < 0.01


def test_16bit_big_endian_tiff_decodes_as_its_8bit_copy():
    a16 = _ramp16()
    tif = _encode(Image.fromarray(a16.astype(">u2")), "TIFF")
    assert Image.open(io.BytesIO(tif)).mode == "I;16B"
    torch.testing.assert_close(decode_image(tif, _cfg()), torch.from_numpy(_as8(a16) / 255.0).float()[None],
                               atol=1 / 255, rtol=0)


def test_32bit_integer_image_is_read_as_16bit_and_refused_outside_that_range():
    a = _ramp16().astype(np.int32)
    tif = _encode(Image.fromarray(a), "TIFF")
    assert Image.open(io.BytesIO(tif)).mode == "I"
    torch.testing.assert_close(decode_image(tif, _cfg()), torch.from_numpy(a / 65535.0).float()[None])
    a[-1, -1] = 70000
    with pytest.raises(ValueError, match=r"mode 'I'.*holds values 0\.\.70000.*16-bit \(0\.\.65535"):
        decode_image(_encode(Image.fromarray(a), "TIFF"), _cfg())
    a[0, 0] = -1
    with pytest.raises(ValueError, match=r"mode 'I'.*holds values -1\.\.70000"):
        decode_image(_encode(Image.fromarray(a), "TIFF"), _cfg())


def test_float_image_is_read_in_0_1_and_refused_outside():
    f = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    tif = _encode(Image.fromarray(f), "TIFF")
    assert Image.open(io.BytesIO(tif)).mode == "F"
    torch.testing.assert_close(decode_image(tif, _cfg(3)), torch.from_numpy(f).expand(3, -1, -1))
    f[3, 3] = 2.5
    with pytest.raises(ValueError, match=r"mode 'F'.*\[0, 1\]"):
        decode_image(_encode(Image.fromarray(f), "TIFF"), _cfg())
    f[3, 3] = np.nan
    with pytest.raises(ValueError, match=r"mode 'F'.*NaN"):
        decode_image(_encode(Image.fromarray(f), "TIFF"), _cfg())


# -- EXIF orientation ---------------------------------------------------------------------------


def _upright() -> np.ndarray:
    """24 x 24 RGB: top third white, the rest dark, a red block bottom right (asymmetric under
    every rotation and flip)."""
    a = np.full((24, 24, 3), 30, np.uint8)
    a[:8] = 230
    a[16:, 16:] = (220, 20, 20)
    return a


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _rotated_jpeg() -> bytes:
    """The upright image stored as a camera held sideways stores it: rotated 90 degrees counter-
    clockwise, with orientation 6 ("rotate 90 clockwise to display")."""
    stored = Image.fromarray(_upright()).transpose(Image.Transpose.ROTATE_90)
    return _encode(stored, "JPEG", quality=95, exif=_exif(6))


def test_exif_orientation_6_jpeg_decodes_upright():
    upright = torch.from_numpy(_upright()).permute(2, 0, 1).float() / 255
    x = decode_image(_rotated_jpeg(), _cfg(3, 24))
    assert (x - upright).abs().mean() < 0.03  # JPEG error only (today: 0.3, the image lies on its side)
    # exif_orientation: false reads the pixels as stored
    stored = torch.rot90(upright, 1, dims=(1, 2))
    assert (decode_image(_rotated_jpeg(), _cfg(3, 24, exif_orientation=False)) - stored).abs().mean() < 0.03


def test_every_exif_orientation_gives_the_upright_image():
    from PIL import ImageOps

    upright = torch.from_numpy(_upright()).permute(2, 0, 1).float() / 255
    # the stored pixels for each tag: the inverse of what the tag says to do when displaying
    inverse = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
               4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
               6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}
    for tag, ops in inverse.items():
        stored = Image.fromarray(_upright())
        for op in ops:
            stored = stored.transpose(op)
        png = _encode(stored, "PNG", exif=_exif(tag))
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(png)))), _upright()), tag
        torch.testing.assert_close(decode_image(png, _cfg(3, 24)), upright, msg=f"orientation {tag}")


def test_gpu_decoding_is_not_used_for_a_jpeg_that_needs_more_than_nvjpeg_does():
    from distributed_attr.io.sources import _nvjpeg_can_decode

    plain = _encode(Image.fromarray(_upright()), "JPEG", quality=95)
    assert _nvjpeg_can_decode(plain, _cfg(3, 24))
    assert not _nvjpeg_can_decode(_rotated_jpeg(), _cfg(3, 24))  # decoded on the CPU, rotated
    assert _nvjpeg_can_decode(_rotated_jpeg(), _cfg(3, 24, exif_orientation=False))
    assert _nvjpeg_can_decode(_encode(Image.fromarray(_upright()), "JPEG", exif=_exif(1)), _cfg(3, 24))
    cmyk = _encode(Image.new("CMYK", (24, 24), (255, 0, 0, 0)), "JPEG")
    assert not _nvjpeg_can_decode(cmyk, _cfg(3, 24))
    icc = _encode(Image.fromarray(_upright()), "JPEG", icc_profile=rgb_swapped_primaries())
    assert not _nvjpeg_can_decode(icc, _cfg(3, 24))


# -- alpha ----------------------------------------------------------------------------------------


def test_rgba_png_is_composited_on_the_background():
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., :3] = (255, 0, 0)      # red where transparent: dropping alpha would show it
    a[:8, ..., 3] = 0              # top half transparent
    a[8:, ..., 1] = 200            # bottom half: (255, 200, 0) at alpha 51 (20%)
    a[8:, ..., 3] = 51
    png = _encode(Image.fromarray(a, "RGBA"), "PNG")
    x = decode_image(png, _cfg(3))  # default background: white
    torch.testing.assert_close(x[:, :8], torch.ones(3, 8, 16))
    expect = 0.2 * torch.tensor([1.0, 200 / 255, 0.0]) + 0.8 * 1.0
    torch.testing.assert_close(x[:, 8:], expect.view(3, 1, 1).expand(3, 8, 16), atol=1 / 255, rtol=0)
    black = decode_image(png, _cfg(3, alpha_background=[0.0]))
    torch.testing.assert_close(black[:, :8], torch.zeros(3, 8, 16))
    coloured = decode_image(png, _cfg(3, alpha_background=[0.0, 0.5, 1.0]))
    torch.testing.assert_close(coloured[:, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    # one channel: the composite's luma (ITU-R 601, as PIL's RGB -> L)
    torch.testing.assert_close(decode_image(png, _cfg(1))[0, :8], torch.ones(8, 16))


def test_la_png_is_composited_on_the_background():
    a = np.zeros((16, 16, 2), np.uint8)
    a[..., 0] = 255
    a[:, :8, 1] = 0
    a[:, 8:, 1] = 255
    png = _encode(Image.fromarray(a, "LA"), "PNG")
    x = decode_image(png, _cfg(1, alpha_background=[0.25]))
    torch.testing.assert_close(x[0, :, :8], torch.full((16, 8), 0.25))
    torch.testing.assert_close(x[0, :, 8:], torch.ones(16, 8))


def test_palette_png_with_a_transparent_entry_is_composited():
    im = Image.new("P", (16, 16), 1)
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)  # entry 0 green, entry 1 red
    im.paste(0, (0, 0, 16, 8))                          # top half entry 0, transparent
    png = _encode(im, "PNG", transparency=0)
    assert Image.open(io.BytesIO(png)).info.get("transparency") == 0
    x = decode_image(png, _cfg(3, alpha_background=[0.0]))
    torch.testing.assert_close(x[:, :8], torch.zeros(3, 8, 16))  # (today: green)
    torch.testing.assert_close(x[:, 8:], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 16))


def test_masks_keep_ignoring_alpha_and_colour_profiles():
    """A mask is read by its values (nonzero = inside), never composited onto a background that
    would make its transparent part 'inside', nor changed by a colour profile."""
    a = np.zeros((16, 16, 2), np.uint8)
    a[:, 8:, 0] = 255
    png = _encode(Image.fromarray(a, "LA"), "PNG")  # fully transparent everywhere
    m = decode_mask(png, _cfg(1))
    assert m[:, 8:].all() and not m[:, :8].any()
    png = _encode(Image.fromarray(a[..., 0]), "PNG", icc_profile=rgb_swapped_primaries())  # (an RGB one)
    assert torch.equal(decode_mask(png, _cfg(1)), m)


# -- colour profiles -------------------------------------------------------------------------------


def test_rgb_image_with_an_icc_profile_is_converted_to_srgb():
    a = np.zeros((16, 16, 3), np.uint8)
    a[:8, :, 0] = 255  # top: (255, 0, 0) in a space whose "red" is sRGB green
    a[8:, :, 1] = 255
    png = _encode(Image.fromarray(a), "PNG", icc_profile=rgb_swapped_primaries())
    x = decode_image(png, _cfg(3))
    torch.testing.assert_close(x[:, :8], torch.tensor([0.0, 1, 0]).view(3, 1, 1).expand(3, 8, 16),
                               atol=2 / 255, rtol=0)  # (today: red)
    torch.testing.assert_close(x[:, 8:], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 16),
                               atol=2 / 255, rtol=0)


def test_cmyk_jpeg_is_converted_with_its_profile_or_by_the_documented_formula():
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 255  # pure cyan ink
    im = Image.fromarray(a, "CMYK")
    with_profile = _encode(im, "JPEG", quality=95, icc_profile=cmyk_rotated())
    x = decode_image(with_profile, _cfg(3))  # the profile says: yellow
    torch.testing.assert_close(x.mean((1, 2)), torch.tensor([1.0, 1.0, 0.0]), atol=3 / 255, rtol=0)
    # no profile: PIL's formula R = 255 - C, ... (K subtracted): cyan
    x = decode_image(_encode(im, "JPEG", quality=95), _cfg(3))
    torch.testing.assert_close(x.mean((1, 2)), torch.tensor([0.0, 1.0, 1.0]), atol=3 / 255, rtol=0)


def test_an_srgb_profile_changes_nothing_and_a_broken_one_fails_naming_it():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    plain = decode_image(_encode(Image.fromarray(a), "PNG"), _cfg(3))
    torch.testing.assert_close(decode_image(_encode(Image.fromarray(a), "PNG", icc_profile=srgb), _cfg(3)), plain)
    with pytest.raises(ValueError, match=r"ICC colour profile cannot be read"):
        decode_image(_encode(Image.fromarray(a), "PNG", icc_profile=b"not a profile at all" * 8), _cfg(3))


def test_ordinary_8bit_images_decode_exactly_as_before():
    """The fast path: plain 8-bit RGB and L JPEG/PNG give PIL's pixels / 255, bit for bit."""
    a = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for payload in (_encode(Image.fromarray(a), "PNG"), _encode(Image.fromarray(a), "JPEG"),
                    _encode(Image.fromarray(a).convert("L"), "PNG")):
        for channels in (1, 3):
            im = Image.open(io.BytesIO(payload)).convert("L" if channels == 1 else "RGB")
            ref = torch.from_numpy(np.array(im, np.float32) / 255.0)
            ref = ref[None] if ref.ndim == 2 else ref.permute(2, 0, 1)
            assert torch.equal(decode_image(payload, _cfg(channels)), ref)


def test_decoding_config_keys_are_validated_and_compared_on_resume():
    base = {"path": "x", "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]}
    c = Config.from_dict({"data": base, "store": "s.zarr"})
    assert c.data.exif_orientation is True and c.data.alpha_background == [1.0]
    off = Config.from_dict({"data": {**base, "exif_orientation": False}, "store": "s.zarr"})
    assert diff_configs(c.to_dict(), off.to_dict()) == ["data.exif_orientation: True -> False"]
    black = Config.from_dict({"data": {**base, "alpha_background": 0}, "store": "s.zarr"})
    assert diff_configs(c.to_dict(), black.to_dict()) == ["data.alpha_background: [1.0] -> [0.0]"]
    with pytest.raises(ConfigError, match=r"^data: alpha_background"):
        Config.from_dict({"data": {**base, "alpha_background": [1.5]}, "store": "s.zarr"})
    with pytest.raises(ConfigError, match=r"^data: alpha_background"):
        Config.from_dict({"data": {**base, "alpha_background": [0.0, 1.0]}, "store": "s.zarr"})


# -- folder sources and symbolic links --------------------------------------------------------------


def _folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_a_symlink_loop_in_an_image_folder_is_an_error_naming_the_link(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "zz_loop").symlink_to(".", target_is_directory=True)
    with pytest.raises(SourceError, match=r"^data\.path '.*': 'zz_loop' is a link to a directory .*a loop"):
        open_source(DataConfig(format="folder", path=str(root)))


def test_a_link_deeper_down_or_out_of_the_folder_is_an_error_naming_it(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "class_1" / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(SourceError, match=r"'class_1/up' is a link to a directory.*a loop"):
        open_source(DataConfig(format="folder", path=str(root)))
    (root / "class_1" / "up").unlink()
    (root / "class_1" / "again").symlink_to(root / "class_0", target_is_directory=True)
    with pytest.raises(SourceError, match=r"'class_1/again' is a link to a directory.*inside the data folder"):
        open_source(DataConfig(format="folder", path=str(root)))
    (root / "class_1" / "again").unlink()
    outside = _folder(tmp_path / "elsewhere", classes=1)
    (root / "class_2").symlink_to(outside / "class_0", target_is_directory=True)
    with pytest.raises(SourceError, match=r"'class_2' is a link to a directory.*outside the data folder"):
        open_source(DataConfig(format="folder", path=str(root)))


def test_linked_files_and_a_linked_data_folder_are_read(tmp_path):
    """Links to image files are read as those files (folders of links make splits), and
    data.path itself may be a link: only links to directories below data.path are refused."""
    root = _folder(tmp_path / "data")
    outside = tmp_path / "other.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(outside)
    (root / "class_1" / "z_linked.png").symlink_to(outside)
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    src = open_source(DataConfig(format="folder", path=str(tmp_path / "alias")))
    recs = list(src.read(0, len(src)))
    assert len(recs) == 7 and [r.label for r in recs] == [0, 0, 0, 1, 1, 1, 1]
    assert recs[-1].key == "class_1/z_linked.png"


# -- WebDataset labels ---------------------------------------------------------------------------


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _png(v: int) -> bytes:
    return _encode(Image.fromarray(np.full((8, 8), v, np.uint8)), "PNG")


def test_webdataset_sample_without_a_valid_label_is_a_failure_with_its_reason(tmp_path):
    _tar(tmp_path / "shard.tar", {
        "a": {"png": _png(10), "cls": b"3"},
        "b": {"png": _png(20)},                      # no label member
        "c": {"png": _png(30), "cls": b"cat"},       # not an integer
        "d": {"png": _png(40), "label.txt": b"-2"},  # not a class index
        "e": {"png": _png(50), "cls.txt": b" 7\n"},
    })
    cfg = _cfg(size=8, format="webdataset", path=str(tmp_path / "shard.tar"))
    recs = {r.key.split(":")[1]: r for r in open_source(cfg).read(0, 5)}
    assert recs["a"].label == 3 and recs["e"].label == 7
    decode_image(recs["a"].payload, cfg)
    decode_image(recs["e"].payload, cfg)
    for key, reason in (("b", r"sample 'b' has no label \(no cls, label, cls\.txt or label\.txt member"),
                        ("c", r"sample 'c': label 'cat' \(member cls\) is not an integer"),
                        ("d", r"sample 'd': label -2 \(member label\.txt\) is not a class index")):
        with pytest.raises(SourceError, match=reason):  # today: label -1, decoded as ok
            decode_image(recs[key].payload, cfg)


def test_parquet_row_with_a_null_label_is_a_failure_with_its_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": _png(v), "path": f"{v}.png"} for v in (10, 20, 30)],
                      "label": pa.array([3, None, 5], pa.int64())})
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = _cfg(size=8, format="parquet", path=str(tmp_path))
    recs = list(open_source(cfg).read(0, 3))
    assert [r.label for r in (recs[0], recs[2])] == [3, 5]
    decode_image(recs[0].payload, cfg)
    assert recs[1].label == -1
    with pytest.raises(SourceError, match=r"row 1 of part-0\.parquet: the label column 'label' is null"):
        decode_image(recs[1].payload, cfg)  # before: label -1, decoded as an ok image


def test_webdataset_without_any_labels_reads_unlabelled(tmp_path):
    _tar(tmp_path / "shard.tar", {"a": {"png": _png(10)}, "b": {"png": _png(20), "json": b"{}"}})
    cfg = _cfg(size=8, format="webdataset", path=str(tmp_path / "shard.tar"))
    src = open_source(cfg)
    recs = list(src.read(0, 2))
    assert [r.label for r in recs] == [-1, -1]
    assert [float(decode_image(r.payload, cfg).mean()) for r in recs] == pytest.approx([10 / 255, 20 / 255])
    # the same from the driver's plan, as a Ray worker opens it
    worker = type(src).from_plan(cfg, None, src.plan())
    assert [r.label for r in worker.read(0, 2)] == [-1, -1]


def test_a_job_records_bad_labels_and_unreadable_modes_as_failed_images(tmp_path, digits_small):
    """In-process (no Ray): the failures above are per-image failures of the job, with their reason;
    the other images of the unit are computed."""
    import zarr
    from conftest import saliency_only

    from distributed_attr.runner import run

    images, labels = digits_small
    samples = {f"{i:03d}": {"png": _encode(Image.fromarray(images[i]), "PNG"), "cls": str(labels[i]).encode()}
               for i in range(6)}
    del samples["001"]["cls"]
    samples["002"]["cls"] = b"seven"
    samples["004"] = {"tif": _encode(Image.fromarray(images[4].astype(np.float32)), "TIFF"),  # 0..255 floats
                      "cls": str(labels[4]).encode()}
    _tar(tmp_path / "shard.tar", samples)
    cfg = saliency_only(tmp_path / "shard.tar", tmp_path / "s.zarr", unit_size=8)
    cfg["data"]["format"] = "webdataset"
    summary = run(cfg, progress=False)
    assert sorted(summary.failures) == [1, 2, 4]
    assert "sample '001' has no label" in summary.failures[1]
    assert "label 'seven' (member cls) is not an integer" in summary.failures[2]
    assert "image mode 'F' (32-bit float) holds values 0.." in summary.failures[4]
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    np.testing.assert_array_equal(g["ok"][:], [True, False, False, True, False, True])
    np.testing.assert_array_equal(g["label"][:], [labels[0], -1, -1, labels[3], labels[4], labels[5]])


# -- `~` in paths ------------------------------------------------------------------------------------


def test_tilde_is_expanded_in_every_config_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = {"data": {"format": "numpy", "path": "~/x.npy", "labels_path": "~/y.npy"},
           "store": "~/out/s.zarr",
           "model": {"kind": "torchscript", "weights": "~/m.pt"},
           "evaluators": {"other": {"kind": "torchscript", "weights": "~/e.pt"}}}
    for cfg in (Config.from_dict(raw), _from_yaml(tmp_path / "cfgdir", raw)):
        assert cfg.store == str(tmp_path / "out" / "s.zarr")
        assert cfg.data.path == str(tmp_path / "x.npy")
        assert cfg.data.labels_path == str(tmp_path / "y.npy")
        assert cfg.model.weights == str(tmp_path / "m.pt")
        assert cfg.evaluators["other"].weights == str(tmp_path / "e.pt")
    # URLs never go through a path function
    cfg = Config.from_dict({**raw, "store": "s3://bucket/~/s.zarr"})
    assert cfg.store == "s3://bucket/~/s.zarr"


def _from_yaml(folder: Path, raw: dict) -> Config:
    import yaml

    folder.mkdir()
    (folder / "job.yaml").write_text(yaml.safe_dump(raw))
    return Config.from_yaml(folder / "job.yaml")


def test_tilde_is_expanded_in_cli_paths(tmp_path, monkeypatch, capsys):
    from distributed_attr.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "~/missing.zarr"]) == 2
    assert repr(str(tmp_path / "missing.zarr")) in capsys.readouterr().err
    assert main(["report", "~/missing.zarr", "--out", "~/rep"]) == 2
    assert repr(str(tmp_path / "missing.zarr")) in capsys.readouterr().err
    assert not (tmp_path / "~").exists()


# -- raw arrays (NumPy sources) ----------------------------------------------------------------------


def test_raw_arrays_are_scaled_by_their_dtype_composited_and_range_checked(tmp_path):
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    cfg1, cfg3 = _cfg(1, size=8, format="numpy"), _cfg(3, size=8, format="numpy")
    # uint16 is divided by 65535 (before: cast unscaled, values up to 65535)
    torch.testing.assert_close(decode_image(rgb8.astype(np.uint16) * 257, cfg3), decode_image(rgb8, cfg3))
    # grey from colour is PIL's luma, as for an image file (before: the channel mean)
    torch.testing.assert_close(decode_image(rgb8, cfg1), decode_image(_encode(Image.fromarray(rgb8), "PNG"), cfg1),
                               atol=1 / 255, rtol=0)
    # alpha is composited on data.alpha_background (before: dropped), as for an RGBA PNG
    rgba = np.concatenate([rgb8, rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)], -1)
    for bg in ([1.0], [0.0, 0.5, 1.0]):
        cfg = _cfg(3, size=8, format="numpy", alpha_background=bg)
        torch.testing.assert_close(decode_image(rgba, cfg), decode_image(_encode(Image.fromarray(rgba), "PNG"), cfg),
                                   atol=1e-5, rtol=0)
    # floats outside [0, 1] are a failed image naming the range (before: read as they are)
    with pytest.raises(ValueError, match=r"float image holds values \d+\.\.\d+, outside \[0, 1\]"):
        decode_image(rgb8.astype(np.float32), cfg3)
    # integer types without an agreed range are refused when the source opens
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.int64))
    with pytest.raises(SourceError, match=r"uint8 \(0\.\.255\), uint16 \(0\.\.65535\) or float \(0\.\.1\), got dtype int64"):
        open_source(_cfg(1, size=8, format="numpy", path=str(tmp_path / "x.npy")))


def test_raw_grey_alpha_arrays_decode_as_la_files_and_odd_channel_counts_are_refused():
    rng = np.random.default_rng(1)
    la = rng.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    png = _encode(Image.fromarray(la, "LA"), "PNG")
    for channels, bg in ((1, [1.0]), (3, [1.0]), (3, [1.0, 0.0, 0.0]), (1, [1.0, 0.0, 0.0])):
        # before: (H, W, 2) was never taken for channels-last (a garbage image, marked ok), and grey
        # on a coloured background was composited on the background's mean
        cfg = _cfg(channels, size=8, format="numpy", alpha_background=bg)
        torch.testing.assert_close(decode_image(la, cfg), decode_image(png, cfg), atol=1 / 255, rtol=0)
    with pytest.raises(ValueError, match=r"raw image of shape \(8, 8, 5\)"):
        decode_image(np.zeros((8, 8, 5), np.uint8), _cfg(3, size=8, format="numpy"))


def test_parquet_labels_that_are_nan_or_not_integral_are_failures(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": _png(v), "path": f"{v}.png"} for v in (10, 20, 30, 40)],
                      "label": pa.array([3.0, float("nan"), 2.5, -1.0], pa.float64())})  # pandas' missing ints
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = _cfg(size=8, format="parquet", path=str(tmp_path))
    src = open_source(cfg)
    recs = list(src.read(0, 4))
    assert [r.label for r in recs] == [3, -1, -1, -1]  # before: int(nan) failed the whole unit; 2.5 read as 2
    decode_image(recs[0].payload, cfg)
    decode_image(recs[3].payload, cfg)  # -1: Hugging Face's unlabelled row, kept
    with pytest.raises(SourceError, match=r"row 1 of part-0\.parquet: the label column 'label' holds nan"):
        decode_image(recs[1].payload, cfg)
    with pytest.raises(SourceError, match=r"holds 2\.5, not an integer"):
        decode_image(recs[2].payload, cfg)
    assert src.labels_all().tolist() == [3, -1, -1, -1]  # before: NaN became -9223372036854775808


def test_a_profile_is_applied_by_what_it_does_not_skipped_by_its_name():
    """Before, any profile whose description starts with "sRGB" was skipped as sRGB itself: a linear
    profile named so ("sRGB-elle-V2-g10.icc") left grey 64 at 0.251 instead of 0.537."""
    from PIL import ImageCms

    grey = np.full((8, 8, 3), 64, np.uint8)
    cfg = _cfg(3, size=8)
    linear = decode_image(_encode(Image.fromarray(grey), "PNG", icc_profile=linear_named_srgb()), cfg)
    v = 64 / 255  # linear light, encoded as sRGB does
    expected = 1.055 * v ** (1 / 2.4) - 0.055
    assert abs(float(linear.mean()) - expected) < 2 / 255, float(linear.mean())
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    same = decode_image(_encode(Image.fromarray(grey), "PNG", icc_profile=srgb), cfg)
    torch.testing.assert_close(same, torch.full_like(same, v))  # sRGB's own profile: nothing to do


def _png16_rgb_with_trns(arr: np.ndarray, trns: tuple[int, int, int]) -> bytes:
    """A real 16-bit RGB PNG with a transparent colour (tRNS), written chunk by chunk (Pillow
    writes no 16-bit RGB PNG)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = arr.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", *trns)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_transparency_is_kept_through_16_bits_and_grey_profiles_or_refused():
    """Before: a 16-bit RGB PNG's transparent colour never matched (transparent parts kept their
    colour, marked ok); a 16-bit grey PNG with a transparent level and a profile lost its
    transparency in the conversion; an 8-bit grey PNG with one and a grey profile failed."""
    white = _cfg(1, size=4)  # background white (the default)
    rgb16 = np.full((4, 4, 3), 20000, np.uint16)
    rgb16[0] = (1000, 2000, 3000)
    with pytest.raises(ValueError, match="16-bit RGB image with a transparent colour"):
        decode_image(_png16_rgb_with_trns(rgb16, (1000, 2000, 3000)), _cfg(3, size=4))
    v = 0.25  # linear light, encoded as sRGB does
    srgb = 1.055 * v ** (1 / 2.4) - 0.055
    for bits, level, clear in ((16, round(v * 65535), 7), (8, round(v * 255), 3)):
        grey = np.full((4, 4), level, np.uint16 if bits == 16 else np.uint8)
        grey[0] = clear
        png = _encode(Image.fromarray(grey), "PNG", transparency=clear, icc_profile=grey_linear())
        t = decode_image(png, white)[0]
        torch.testing.assert_close(t[0], torch.ones(4))  # transparent: the background
        assert (t[1:] - srgb).abs().max() < 2 / 255, (bits, t[1:])  # opaque: the profile applied
