"""ShardReader (the aggregation job's fast read path) against zarr's own reader, byte for byte."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from distributed_attr.io.shard_reader import ShardReader, zstd_content_size


def _sharded(root, name, data, unit, inner, fill):
    arr = root.create_array(name, shape=data.shape, chunks=(inner, *data.shape[1:]),
                            shards=(unit, *data.shape[1:]), dtype=data.dtype, fill_value=fill)
    return arr


def _read_all(reader, n_rows):
    n_chunks = -(-n_rows // reader.rows_per_chunk)
    return reader.read(0, n_chunks - 1)[:n_rows]


def _same_bytes(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()  # NaN fill values included


def test_sharded_plain_and_partial_arrays_equal_zarr(tmp_path):
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    n, unit, inner = 70, 16, 4  # 70 rows: the last shard is partial
    maps = rng.normal(size=(n, 5, 6)).astype(np.float16)
    a = _sharded(root, "maps", maps, unit, inner, float("nan"))
    a[:16] = maps[:16]            # shard 0 complete
    a[16:20] = maps[16:20]        # shard 1: only its first inner chunk; the rest never written
    a[48:70] = maps[48:70]        # shards 3 and 4 (partial); shard 2 never written
    ok = root.create_array("ok", shape=(n,), chunks=(unit,), dtype="bool", fill_value=False)
    ok[:40] = rng.random(40) > 0.3
    target = root.create_array("target", shape=(n,), chunks=(unit,), dtype="int64", fill_value=-1)
    target[:] = rng.integers(0, 10, n)
    spectra = root.create_array("spectra", shape=(n, 3, 4), chunks=(8, 3, 4), shards=(unit, 3, 4),
                                dtype="float32", fill_value=float("nan"))
    spectra[:32] = rng.random((32, 3, 4)).astype(np.float32)

    for arr in (a, ok, target, spectra):
        reader = ShardReader.for_array(arr)
        assert reader is not None and reader.rows_per_chunk == unit
        _same_bytes(_read_all(reader, n), arr[:])
    # a reused buffer and a block in the middle
    reader = ShardReader.for_array(a)
    buf = reader.buffer(2)
    buf[...] = 7
    _same_bytes(reader.read(1, 2, buf), a[16:48])
    assert np.isnan(buf[4:].astype(np.float32)).all()  # absent inner chunks and shard: the fill value
    with pytest.raises(ValueError, match=r"out must be C-contiguous float16 with shape \(>=32, 5, 6\)"):
        reader.read(1, 2, np.empty((20, 5, 6), np.float16))


def test_other_layouts_are_left_to_zarr(tmp_path):
    from zarr.codecs import BloscCodec, BytesCodec

    root = zarr.open_group(str(tmp_path / "o.zarr"), mode="w", zarr_format=3)
    x = np.arange(64, dtype=np.float32).reshape(16, 4)
    blosc = root.create_array("blosc", data=x, chunks=(4, 4), compressors=[BloscCodec()])
    raw = root.create_array("raw", data=x, chunks=(4, 4), compressors=None)
    tiled = root.create_array("tiled", data=x, chunks=(4, 2))  # chunked along a second axis
    big_endian = root.create_array("big", data=x, chunks=(4, 4), serializer=BytesCodec(endian="big"))
    # a big-endian dtype stored little-endian: the bytes on disk are not the buffer's byte order
    big_dtype = root.create_array("big_dtype", data=np.arange(64, dtype=">i4").reshape(16, 4), chunks=(4, 4))
    for arr in (blosc, raw, tiled, big_endian, big_dtype):
        assert ShardReader.for_array(arr) is None, arr.path
    memory = zarr.create_array(store={}, shape=(16, 4), chunks=(4, 4), dtype="float32")
    assert ShardReader.for_array(memory) is None  # not a local file system


def test_corrupt_shards_raise_naming_the_file(tmp_path):
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    x = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    a = _sharded(root, "m", x, 8, 2, float("nan"))
    a[:] = x
    reader = ShardReader.for_array(a)
    shard = os.path.join(str(tmp_path / "c.zarr"), "m", "c", "0", "0")
    data = bytearray(Path(shard).read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the index
    Path(shard).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c/0/0: the shard index checksum does not match"):
        reader.read(0, 0)
    Path(shard).write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(ValueError, match="shorter than its index"):
        reader.read(0, 0)
    _same_bytes(reader.read(1, 1), x[8:])  # the other shard is unaffected
    # an index entry with only its offset marked absent (a corrupt index with a valid checksum)
    Path(shard).unlink()
    a[:8] = x[:8]
    data = bytearray(Path(shard).read_bytes())
    n_inner = 4
    index = np.frombuffer(bytes(data[-(16 * n_inner + 4):-4]), dtype="<u8").copy().reshape(n_inner, 2)
    index[1, 0] = 2**64 - 1
    import google_crc32c

    raw = index.astype("<u8").tobytes()
    data[-(16 * n_inner + 4):] = raw + np.uint32(google_crc32c.value(raw)).tobytes()
    Path(shard).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c/0/0: inner chunk 1 points past the shard's data"):
        reader.read(0, 0)
    with pytest.raises(ValueError, match="need 0 <= first_chunk <= last_chunk"):
        reader.read(1, 0)


def test_zstd_content_size_from_the_frame_header():
    from numcodecs import Zstd

    for n in (0, 1, 255, 256, 65_791, 65_792, 1 << 20):
        assert zstd_content_size(Zstd().encode(bytes(n))) == n
    with pytest.raises(ValueError, match="not a zstd frame"):
        zstd_content_size(b"PK\x03\x04 not zstd")


def test_a_chunk_of_the_wrong_size_is_refused(tmp_path):
    """A plain chunk that decodes to fewer bytes than the chunk shape (a foreign writer's bug)
    is an error, not a silently half-filled buffer."""
    from numcodecs import Zstd

    root = zarr.open_group(str(tmp_path / "w.zarr"), mode="w", zarr_format=3)
    a = root.create_array("v", shape=(8,), chunks=(4,), dtype="float32", fill_value=0.0)
    a[:] = np.arange(8, dtype=np.float32)
    chunk = os.path.join(str(tmp_path / "w.zarr"), "v", "c", "1")
    Path(chunk).write_bytes(Zstd().encode(np.zeros(3, np.float32).tobytes()))
    reader = ShardReader.for_array(a)
    with pytest.raises(ValueError, match=r"c/1: a chunk holds 12 bytes, the array's chunk shape needs 16"):
        reader.read(0, 1)
