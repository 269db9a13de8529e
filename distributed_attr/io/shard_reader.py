"""A fast path for reading whole shards of the store's arrays into reusable buffers.

Why: the aggregation job reads every shard of every array once, front to back. Through zarr's
generic pipeline (``array[start:stop]``) a 2 MB shard costs ~7 ms on a 2-core machine: every
inner chunk is decoded into a freshly allocated buffer (page faults), copied into a freshly
allocated output, and the bookkeeping runs in Python under the GIL in zarr's event-loop thread.
Our stores use one layout (``docs/store.md``): a regular chunk grid along ``image`` only, each
chunk either plain (``bytes`` + ``zstd``) or a shard (``sharding_indexed`` with inner chunks
``bytes`` + ``zstd`` and the index ``bytes`` + ``crc32c`` at the end). For exactly that layout on a
local file system, ``ShardReader`` reads the shard file in one call, checks the index checksum,
and lets zstd decompress each inner chunk straight into the caller's buffer; the file read and
the decompression release the GIL, so reads of several arrays overlap in threads and with the
caller's NumPy work. Measured in ``bench/aggregate.py`` (docs/benchmarks-aggregate.md).

Anything else (another codec chain, an object store, a big-endian host) is not guessed at:
``ShardReader.for_array`` returns ``None`` and the caller reads through zarr. Tests compare the
two readers byte for byte, including absent shards, absent inner chunks and a partial last shard.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

__all__ = ["ShardReader"]

#: an inner chunk that was never written has offset and length 2**64 - 1 in the shard index
_ABSENT = 2**64 - 1


def _codec_names(codecs: Any) -> list[str]:
    return [c.get("name") for c in codecs] if isinstance(codecs, (list, tuple)) else []


def _plain_chain(codecs: Any) -> bool:
    """``bytes`` (little-endian, or no endianness for 1-byte types) followed by ``zstd``."""
    if _codec_names(codecs) != ["bytes", "zstd"]:
        return False
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    return endian == "little"


class ShardReader:
    """Reads whole outer chunks (shards, or plain chunks) of one array along axis 0.

    ``read(first_chunk, last_chunk, out)`` fills ``out`` (C-contiguous, at least
    ``(last - first + 1) * rows_per_chunk`` rows of the array's row shape and dtype) and returns
    it: a reused ``out`` costs no allocation. Rows past the array's end are left as they are
    (the caller slices them off); chunks or inner chunks never written read as the fill value,
    as in zarr."""

    def __init__(self, path: str, dtype: np.dtype, row_shape: tuple[int, ...], rows_per_chunk: int,
                 rows_per_inner: int | None, key_of, fill: Any):
        from numcodecs import Zstd

        self.path = path
        self.dtype = dtype
        self.row_shape = tuple(row_shape)
        self.rows_per_chunk = int(rows_per_chunk)
        self.rows_per_inner = rows_per_inner  # None: one zstd frame per chunk (no sharding)
        self._key_of = key_of
        self._fill = fill
        self._zstd = Zstd()

    @classmethod
    def for_array(cls, array: Any) -> "ShardReader | None":
        """A reader for a ``zarr.Array`` in our layout on a local store; ``None`` otherwise."""
        if sys.byteorder != "little":
            return None
        try:
            from zarr.storage import LocalStore

            meta = array.metadata.to_dict()
            store_path = array.store_path
            if not isinstance(store_path.store, LocalStore) or meta.get("zarr_format") != 3:
                return None
            if meta["chunk_grid"].get("name") != "regular" or meta.get("storage_transformers"):
                return None
            dtype = np.dtype(array.dtype)
            # the buffer takes the bytes as they are: they must be in the dtype's own byte order
            if dtype.hasobject or dtype.kind not in "biuf" or dtype.byteorder not in "=|<":
                return None
            shape = tuple(int(s) for s in array.shape)
            chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            if len(shape) == 0 or tuple(chunk_shape[1:]) != shape[1:]:
                return None  # chunked along axis 0 only
            codecs = meta["codecs"]
            rows_per_inner = None
            if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
                conf = codecs[0].get("configuration") or {}
                inner = tuple(conf.get("chunk_shape", ()))
                if (tuple(inner[1:]) != shape[1:] or not inner or chunk_shape[0] % inner[0]
                        or not _plain_chain(conf.get("codecs"))
                        or _codec_names(conf.get("index_codecs")) != ["bytes", "crc32c"]
                        or ((conf.get("index_codecs")[0].get("configuration") or {}).get("endian", "little")
                            != "little")
                        or conf.get("index_location", "end") != "end"):
                    return None
                rows_per_inner = int(inner[0])
            elif not _plain_chain(codecs):
                return None
            root = str(store_path.store.root)
            encoding = array.metadata.chunk_key_encoding

            def key_of(chunk: int) -> str:
                return encoding.encode_chunk_key((chunk,) + (0,) * (len(shape) - 1))

            path = os.path.join(root, store_path.path) if store_path.path else root
            return cls(path, dtype, shape[1:], int(chunk_shape[0]), rows_per_inner, key_of, array.fill_value)
        except (AttributeError, KeyError, TypeError, ValueError, ImportError):
            return None

    # -- reading ---------------------------------------------------------------------------------
    def buffer(self, n_chunks: int) -> np.ndarray:
        """An output buffer for ``n_chunks`` whole chunks."""
        return np.empty((n_chunks * self.rows_per_chunk, *self.row_shape), dtype=self.dtype)

    def read(self, first_chunk: int, last_chunk: int, out: np.ndarray | None = None) -> np.ndarray:
        n = last_chunk - first_chunk + 1
        if first_chunk < 0 or n < 1:
            raise ValueError(f"ShardReader.read: need 0 <= first_chunk <= last_chunk, got {first_chunk}, {last_chunk}")
        rows = n * self.rows_per_chunk
        if out is None:
            out = self.buffer(n)
        if out.dtype != self.dtype or tuple(out.shape[1:]) != self.row_shape or out.shape[0] < rows \
                or not out.flags.c_contiguous:
            raise ValueError(f"ShardReader.read: out must be C-contiguous {self.dtype} with shape "
                             f"(>={rows}, {', '.join(map(str, self.row_shape))}), got {out.dtype} {out.shape}")
        for i, chunk in enumerate(range(first_chunk, last_chunk + 1)):
            r0 = i * self.rows_per_chunk
            self._read_chunk(chunk, out[r0:r0 + self.rows_per_chunk])
        return out

    def _read_chunk(self, chunk: int, out: np.ndarray) -> None:
        file = os.path.join(self.path, *self._key_of(chunk).split("/"))
        try:
            with open(file, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            out[...] = self._fill
            return
        flat = out.reshape(-1).view(np.uint8)
        if self.rows_per_inner is None:
            self._decode(data, flat, file)
            return
        n_inner = self.rows_per_chunk // self.rows_per_inner
        index_bytes = 16 * n_inner
        if len(data) < index_bytes + 4:
            raise ValueError(f"{file}: shard of {len(data)} bytes is shorter than its index ({index_bytes + 4})")
        import google_crc32c

        index_raw = memoryview(data)[len(data) - index_bytes - 4:len(data) - 4]
        stored = bytes(memoryview(data)[len(data) - 4:])
        if np.uint32(google_crc32c.value(bytes(index_raw))).tobytes() != stored:
            raise ValueError(f"{file}: the shard index checksum does not match (corrupt or truncated shard)")
        index = np.frombuffer(index_raw, dtype="<u8").reshape(n_inner, 2).tolist()  # Python ints: no wrap-around
        per_inner = flat.size // n_inner
        view = memoryview(data)
        for j, (offset, length) in enumerate(index):
            target = flat[j * per_inner:(j + 1) * per_inner]
            if offset == _ABSENT and length == _ABSENT:
                out[j * self.rows_per_inner:(j + 1) * self.rows_per_inner] = self._fill
                continue
            if offset + length > len(data) - index_bytes - 4:
                raise ValueError(f"{file}: inner chunk {j} points past the shard's data")
            self._decode(view[offset:offset + length], target, file)

    def _decode(self, src: Any, target: np.ndarray, file: str) -> None:
        try:
            size = zstd_content_size(src)
            if size is not None and size != target.nbytes:
                raise ValueError(f"a chunk holds {size} bytes, the array's chunk shape needs {target.nbytes}")
            self._zstd.decode(src, out=target)
        except (ValueError, RuntimeError) as err:  # numcodecs raises RuntimeError for bad frames
            raise ValueError(f"{file}: {err}") from err


def zstd_content_size(frame: Any) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878, section 3.1.1.1), or None
    when the header does not declare it. Raises ValueError for something that is not a frame."""
    head = bytes(memoryview(frame)[:18])
    if len(head) < 5 or int.from_bytes(head[:4], "little") != 0xFD2FB528:
        raise ValueError("not a zstd frame (bad magic number)")
    descriptor = head[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0:
        return None
    if len(head) < pos + width:
        raise ValueError("truncated zstd frame header")
    value = int.from_bytes(head[pos:pos + width], "little")
    return value + 256 if width == 2 else value
