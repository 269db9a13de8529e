"""Data and stores on object storage, against a real S3-compatible server on loopback.

moto's server mode runs in this process on 127.0.0.1 and a free port; every client (obstore for
the store, the lease and the sources; s3fs for xarray; boto3 for setting up) reaches it through
``AWS_ENDPOINT_URL``. No mocks between our code and the HTTP API."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")

from distributed_attr.cli import main  # noqa: E402
from distributed_attr.config import ConfigError  # noqa: E402
from distributed_attr.io.store import StoreError  # noqa: E402
from distributed_attr.runner import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BUCKET = "attr-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A fresh S3 server on loopback for this module; its endpoint in the environment (so that
    Ray workers started later inherit it too), restored afterwards."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def s3_data(s3, parquet_dir):
    import boto3

    client = boto3.client("s3")
    for f in sorted(Path(parquet_dir).glob("*.parquet")):
        client.upload_file(str(f), BUCKET, f"digits/{f.name}")
    return f"s3://{BUCKET}/digits/*.parquet"


def small(make_config, data, store, **run_over):
    cfg = make_config(data, store, **run_over)
    cfg["methods"] = {"saliency": {}, "integrated_gradients": {"steps": 4}}
    return cfg


def arrays(group):
    return {k: group[k][:] for k in ("maps/saliency", "maps/integrated_gradients", "target", "ok", "image", "label",
                                     "source_key")}


def s3_group(url):
    from distributed_attr.io.store import open_group

    return open_group(url, "r")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, parquet_dir):
    from conftest import base_config

    path = tmp_path_factory.mktemp("local") / "local.zarr"
    run(small(base_config, parquet_dir, path), progress=False)
    return path


def test_the_job_reads_and_writes_s3_is_resumed_and_equals_the_local_job(s3, s3_data, make_config, local_reference,
                                                                        tmp_path, capsys):
    url = f"s3://{BUCKET}/runs/a.zarr"
    cfg = small(make_config, s3_data, url)

    def stop_after_unit_2(unit):
        if unit == 2:
            raise KeyboardInterrupt

    first = run(cfg, progress=False, _after_commit=stop_after_unit_2)
    assert first.interrupted and first.units_done == 3
    second = run(cfg, resume=True, progress=False)
    assert second.units_this_run == 3 and second.units_done == 6
    local = arrays(zarr.open_group(str(local_reference), mode="r"))
    remote = arrays(s3_group(url))
    for k in local:
        np.testing.assert_array_equal(local[k], remote[k], err_msg=k)

    # every command takes the URL
    assert main(["inspect", url, "--verify"]) == 0
    assert "6/6 units, 96/96 images (complete)" in capsys.readouterr().out
    out_remote, out_local = tmp_path / "agg-s3", tmp_path / "agg-local"
    assert main(["aggregate", url, "--workers", "0", "--out", str(out_remote), "--json"]) == 0
    import json

    got = json.loads(capsys.readouterr().out)
    assert main(["aggregate", str(local_reference), "--workers", "0", "--out", str(out_local), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert got["summary"] == want["summary"] and got["images"] == want["images"] == 96
    assert got["shard_reader"].startswith("zarr (the store is on object storage")  # said, not silent
    assert want["shard_reader"].startswith("fast")
    from distributed_attr.io.store import walk_arrays

    a, b = s3_group(url), zarr.open_group(str(local_reference), mode="r")
    written = [(name, arr) for name, arr in walk_arrays(b["aggregates"])]
    assert len(written) > 10
    for name, arr in written:
        np.testing.assert_array_equal(a[f"aggregates/{name}"][...], arr[...], err_msg=name)
    # written in place on object storage, its completion marker last: whole and current
    assert a["aggregates"].attrs["complete"] is True and a["aggregates"].attrs["units_done"] == 6
    assert main(["inspect", url]) == 0
    assert capsys.readouterr().out.startswith("store ")  # no warning line first


def test_xarray_opens_the_store_by_url(s3, s3_data, make_config):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("s3fs")
    url = f"s3://{BUCKET}/runs/xr.zarr"
    run(small(make_config, s3_data, url), progress=False)
    ds = xr.open_zarr(url, group="maps", consolidated=False,
                      storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    assert ds["saliency"].dims == ("image", "y", "x") and ds["saliency"].shape == (96, 32, 32)
    assert np.isfinite(ds["saliency"].values).all()


def test_the_store_on_s3_has_one_driver_at_a_time(s3):
    from distributed_attr.io.lease import LeaseError, LeaseInfo, StoreLease, lease_info

    url = f"s3://{BUCKET}/leases/one.zarr"
    first = StoreLease.acquire(url)
    with pytest.raises(LeaseError, match="in use by another driver pid"):
        StoreLease.acquire(url)
    # A lease whose driver stopped beating elsewhere expires and is taken over (If-Match CAS) ...
    import obstore

    from distributed_attr.io.storage import object_store

    stale = LeaseInfo(**{**first.info.__dict__, "host": "elsewhere", "heartbeat": 0.0})
    obstore.put(object_store(url), "lease/zarr.json", stale.metadata().encode())
    second = StoreLease.acquire(url)
    assert lease_info(url).owner == second.info.owner
    # ... and the first driver finds out at its next heartbeat, before it commits anything.
    first.heartbeat()
    with pytest.raises(LeaseError, match="took the store over"):
        first.check()
    second.release()
    assert lease_info(url) is None


def test_clearing_a_store_on_s3_deletes_its_nodes_and_keeps_other_objects(s3):
    import boto3
    import obstore

    from distributed_attr.io.storage import object_store
    from distributed_attr.io.store import AttributionStore, StorePlan, classify_path, clear_store, unfinished_store

    url = f"s3://{BUCKET}/clear/s.zarr"
    AttributionStore.create(url, StorePlan(n_images=4, unit_size=2, image_shape=(1, 4, 4), methods=["saliency"]))
    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="clear/s.zarr/notes.txt", Body=b"mine")
    assert classify_path(url) == "store" and unfinished_store(url) is not None  # no unit done
    AttributionStore.open(url)  # every node readable and present
    assert clear_store(url) == ["notes.txt"]
    left = [o["path"] for batch in obstore.list(object_store(url)) for o in batch]
    assert left == ["notes.txt"]
    assert client.get_object(Bucket=BUCKET, Key="clear/s.zarr/notes.txt")["Body"].read() == b"mine"


def test_bad_locations_fail_before_any_work_and_change_nothing(s3, s3_data, make_config, tmp_path, monkeypatch,
                                                              capsys):
    import boto3

    # an unknown scheme names the known ones
    with pytest.raises(ConfigError, match=r"unknown URL scheme 'hdfs://'; known: file://, s3://"):
        run(small(make_config, s3_data, "hdfs://nn/x.zarr"), progress=False)
    # a bucket that does not exist
    with pytest.raises(StoreError, match="no-such-bucket"):
        run(small(make_config, s3_data, "s3://no-such-bucket/x.zarr"), progress=False)
    from distributed_attr.io.sources import SourceError

    with pytest.raises(SourceError, match="no-such-bucket"):
        run(small(make_config, "s3://no-such-bucket/d/*.parquet", tmp_path / "x.zarr"), progress=False)
    assert not (tmp_path / "x.zarr").exists()
    # a URL that holds something else: refused, nothing deleted
    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="someone/else/notes.txt", Body=b"theirs")
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(StoreError, match="not an attribution store"):
            run(small(make_config, s3_data, f"s3://{BUCKET}/someone/else"), progress=False, **flags)
    assert client.get_object(Bucket=BUCKET, Key="someone/else/notes.txt")["Body"].read() == b"theirs"
    # a missing optional package: the install command, before anything happens
    import sys

    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(ConfigError, match=r"pip install 'distributed-attr\[s3\]'"):
        run(small(make_config, s3_data, f"s3://{BUCKET}/y.zarr"), progress=False)
    monkeypatch.undo()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(small(make_config, s3_data, "gs://b/x.zarr")))
    monkeypatch.setitem(sys.modules, "obstore", None)
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
    assert "pip install 'distributed-attr[gcs]'" in capsys.readouterr().err


def test_object_store_errors_say_what_to_check():
    from distributed_attr.io.storage import describe_error

    class Forbidden(Exception):
        pass

    msg = describe_error(Forbidden("Client error with status 403 Forbidden: AccessDenied"), "s3://b/x.zarr")
    assert "credentials refused" in msg and "s3://b/x.zarr" in msg


def test_wrong_credentials_are_one_clear_error_before_any_work(make_config, parquet_dir, monkeypatch, capsys,
                                                              tmp_path):
    """A second S3 server that checks signatures (moto with authentication on from its first
    request, in its own process): unknown keys are refused by the server, and the job says so in
    one line, before any work."""
    import subprocess
    import sys
    import time

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG",
                     "AWS_SECRET_ACCESS_KEY": "not-the-secret", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ALLOW_HTTP": "true"}.items():
            monkeypatch.setenv(k, v)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(small(make_config, parquet_dir, f"s3://{BUCKET}/x.zarr")))
        assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot reach the store at 's3://attr-test/x.zarr'") and "403" in err, err
        assert "credentials refused" in err and "Traceback" not in err and "not-the-secret" not in err
    finally:
        server.terminate()
        server.wait(timeout=30)
