"""Shared fixtures: real digits written as a user's dataset, and the trained zoo model."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spinning
    threads make them ~50x slower; restored afterwards. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_small():
    """96 real digits (uint8, 32 px) and labels from the held-out split."""
    from distributed_attr.data import digits_uint8

    return digits_uint8(32, n=96)


@pytest.fixture(scope="session")
def parquet_dir(tmp_path_factory, digits_small):
    from distributed_attr.data import write_parquet_shards

    d = tmp_path_factory.mktemp("parquet")
    write_parquet_shards(d, *digits_small, shards=3, row_group_size=10)
    return d


@pytest.fixture(scope="session")
def zoo_cnn():
    from distributed_attr import zoo

    model, path = zoo.pretrained("digits_cnn")
    return model, path


def base_config(data_path, store, **run) -> dict:
    cfg = {
        "data": {"format": "parquet", "path": str(data_path), "image_size": 32, "channels": 1,
                 "mean": [0.0], "std": [1.0]},
        "store": str(store),
        "model": {"kind": "zoo", "name": "digits_cnn"},
        "methods": {"saliency": {}, "integrated_gradients": {"steps": 4}},
        "spectra": {"enabled": False},
        "run": {"num_workers": 0, "unit_size": 16, "batch_size": 8, **run},
    }
    return cfg


def saliency_only(data_path, store, **run) -> dict:
    """``base_config`` with Saliency alone: the cheapest job, for tests of orchestration and storage."""
    cfg = base_config(data_path, store, **run)
    cfg["methods"] = {"saliency": {}}
    return cfg


@pytest.fixture(scope="session")
def reference(tmp_path_factory, parquet_dir):
    """The arrays (``COMPARED``) of a fault-free store of ``saliency_only``'s config, to compare
    recovered stores with (test_faults makes its own, sequential one)."""
    from distributed_attr.runner import run

    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run(saliency_only(parquet_dir, path), progress=False)
    return read_arrays(path)


#: the per-image arrays that stores are compared on after faults
COMPARED = ("maps/saliency", "target", "ok", "image", "label", "source_key")


def read_arrays(store, names=COMPARED) -> dict:
    """``{name: values}`` of a store (a path, or an open zarr group)."""
    import zarr

    g = store if isinstance(store, zarr.Group) else zarr.open_group(str(store), mode="r")
    return {k: g[k][:] for k in names}


@pytest.fixture
def make_config():
    return base_config
