"""Short object-store outages in the middle of a job, on a real S3 server on loopback (issue 20,
item 8: survive transient object-store faults).

The server is moto's, in a process of its own (``support/restartable_s3.py``), so that it can be
frozen (SIGSTOP: connections accepted, nothing answered) and killed and started again on the same
port (connections refused until the new process listens; moto's request recording, replayed before
the port opens, brings its buckets back). Each outage starts from inside the job, after its first
commit, while units remain to be written. Before the fix, a refused connection failed the unit's
write after obstore's 10 quick retries (~2-4 s) and with it the job ("unit 1 failed:
GenericError ..."), and a lease refresh that timed out once stopped the job ("lost the lease ...
could not be refreshed"); both need ``--resume`` today."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("moto.server")

from conftest import COMPARED, read_arrays, saliency_only  # noqa: E402
from distributed_attr.runner import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SUPPORT = Path(__file__).resolve().parent / "support"
BUCKET = "outages"


class S3Server:
    """moto on 127.0.0.1:``port`` in its own process, with its request recording in ``recording``."""

    def __init__(self, recording: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.recording = recording
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ, MOTO_RECORDER_FILEPATH=str(self.recording))
        self.proc = subprocess.Popen([sys.executable, str(SUPPORT / "restartable_s3.py"), "127.0.0.1", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the S3 server did not listen on port {self.port} within {timeout:.0f} s")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "recording.jsonl")
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.port}", "AWS_ACCESS_KEY_ID": "testing",
                         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                         "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}.items():
                mp.setenv(k, v)
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield server
    finally:
        server.close()


def assert_equal_to(reference, url):
    from distributed_attr.io.store import open_group

    got = read_arrays(open_group(url, "r"), COMPARED)
    for k in COMPARED:
        np.testing.assert_array_equal(reference[k], got[k], err_msg=k)


def test_a_server_frozen_for_10_s_mid_job_is_waited_for(s3, parquet_dir, reference, capsys):
    """SIGSTOP for 10 s after the first commit: requests time out (after 1 s here) and are tried
    again, the lease refresh (every 8 s) fails for ~10 s of the lease's 32 s life and the lease is
    kept (the job would stop at 25.6 s), and the job ends complete."""
    url = f"s3://{BUCKET}/frozen.zarr"
    cfg = saliency_only(parquet_dir, url, storage_retry_seconds=20, lease_seconds=32)
    cfg["storage_options"] = {"client_options": {"timeout": "1s"}}  # AWS_ALLOW_HTTP still applies
    frozen: list[float] = []

    def freeze(unit):
        if not frozen:
            s3.signal(signal.SIGSTOP)
            frozen.append(time.monotonic())
            threading.Timer(10.0, s3.signal, (signal.SIGCONT,)).start()

    summary = run(cfg, progress=False, _after_commit=freeze)
    assert frozen and time.monotonic() - frozen[0] >= 10.0, "the job went on while the server was frozen"
    assert summary.units_done == summary.units == 6 and not summary.interrupted and not summary.failures
    assert summary.retries == 0  # waited for, not failed and redone
    assert "could not be refreshed" in capsys.readouterr().err  # the lease met the freeze and was kept
    assert_equal_to(reference, url)


@pytest.mark.ray
def test_a_server_stopped_and_started_again_mid_job_is_waited_for(s3, parquet_dir, reference, tmp_path, monkeypatch):
    """The server killed after the first commit and started again on the same port 6 s later,
    while an actor is writing units: writes are refused for longer than the retry window (4 s), so
    a unit's write fails, goes back to the queue, and is done again once the server is back."""
    from distributed_attr.ray_session import ray_session

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(SUPPORT))
    url = f"s3://{BUCKET}/restarted.zarr"
    cfg = saliency_only(parquet_dir, url, num_workers=1, storage_retry_seconds=4, max_retries=10)
    # the zoo's CNN, sleeping 0.1 s per forward pass inside an actor: units outlast the commit
    cfg["model"] = {"kind": "callable", "name": "fault_models:marked_digits",
                    "kwargs": {"marker_dir": str(tmp_path), "delay": 0.1}}
    stopped: list[float] = []
    restarted = threading.Event()

    def stop_and_restart(unit):
        if not stopped:
            s3.kill()
            stopped.append(time.monotonic())

            def restart():
                time.sleep(6.0)
                s3.start()
                restarted.set()

            threading.Thread(target=restart, daemon=True).start()

    with ray_session(None, num_cpus=2, object_store_memory=150_000_000):
        summary = run(cfg, progress=False, _after_commit=stop_and_restart)
    assert stopped and restarted.wait(timeout=60)
    assert summary.units_done == summary.units == 6 and not summary.failures
    assert summary.retries >= 1, "no write met the outage"
    assert_equal_to(reference, url)


def test_the_retry_window_must_be_shorter_than_the_lease():
    from distributed_attr.config import Config, ConfigError

    raw = {"data": {"path": "d", "format": "parquet"}, "store": "s.zarr"}
    with pytest.raises(ConfigError, match=r"run\.storage_retry_seconds: 200 s must be less than run\.lease_seconds "
                                          r"\(180 s\)"):
        Config.from_dict({**raw, "run": {"storage_retry_seconds": 200}})
    with pytest.raises(ConfigError, match=r"run\.lease_seconds: must be > 0"):
        Config.from_dict({**raw, "run": {"lease_seconds": 0}})
    run_cfg = Config.from_dict(raw).run
    assert run_cfg.storage_retry_seconds >= 60 and run_cfg.storage_retry_seconds < run_cfg.lease_seconds


def test_a_refused_connection_is_transient_and_a_refusal_is_not(s3):
    """Real errors: a port nobody listens on (retried for the window, then transient), and the
    server's own refusals (a missing key, a stale conditional write), which no retry changes."""
    import obstore
    from obstore.exceptions import PreconditionError

    from distributed_attr.io.storage import is_transient, object_store, set_retry_window

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    before = set_retry_window(1.0)
    try:
        store = object_store(f"s3://{BUCKET}/t", {"aws_endpoint": f"http://127.0.0.1:{closed}"})
        t0 = time.monotonic()
        with pytest.raises(Exception) as refused:
            obstore.put(store, "k", b"x")
        assert 1.0 <= time.monotonic() - t0 < 10, "retried for the window, then given up"
        assert is_transient(refused.value)
        live = object_store(f"s3://{BUCKET}/t")
        with pytest.raises(FileNotFoundError) as missing:
            obstore.get(live, "nothing-here")
        tag = obstore.put(live, "k", b"1")["e_tag"]
        obstore.put(live, "k", b"2")
        with pytest.raises(PreconditionError) as stale:
            obstore.put(live, "k", b"3", mode={"e_tag": tag})
        assert not is_transient(missing.value) and not is_transient(stale.value)
    finally:
        set_retry_window(before)


def test_a_lease_refresh_that_landed_unanswered_keeps_the_lease(s3):
    """A conditional refresh that timed out may still have been applied by the server (as happens
    during a freeze): the next refresh, refused as stale, finds our own owner id and keeps the
    lease instead of reporting it taken over."""
    import dataclasses

    import obstore

    from distributed_attr.io.lease import StoreLease, lease_info
    from distributed_attr.io.storage import object_store

    url = f"s3://{BUCKET}/leases/landed.zarr"
    lease = StoreLease.acquire(url, ttl=30)
    landed = dataclasses.replace(lease.info, heartbeat=lease.info.heartbeat + 1)
    obstore.put(object_store(url), "lease/zarr.json", landed.metadata().encode())  # a new ETag
    lease.heartbeat()
    lease.check()
    assert lease.lost is None and lease_info(url).owner == lease.info.owner
    lease.heartbeat()  # with the adopted version: a plain refresh again
    assert lease.lost is None
    lease.release()
    assert lease_info(url) is None


def test_a_server_that_stays_down_fails_the_job_in_one_line_after_max_retries(s3, parquet_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """In the driver (``num_workers: 0``): the unit whose write fails after the window goes back to
    the queue, and fails the job once it has failed more than ``run.max_retries`` times."""
    import yaml

    from distributed_attr.cli import main

    url = f"s3://{BUCKET}/down.zarr"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        saliency_only(parquet_dir, url, storage_retry_seconds=1, max_retries=1)))
    stopped: list[float] = []

    def stop(unit):
        if not stopped:
            s3.kill()
            stopped.append(time.monotonic())

    from distributed_attr import runner

    real_run = runner.run
    monkeypatch.setattr(runner, "run", lambda *a, **k: real_run(*a, **k, _after_commit=stop))  # the CLI's job
    try:
        assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
    finally:
        if stopped:
            s3.start()  # for the tests after this one
    err = capsys.readouterr().err
    assert stopped, "the job never committed a unit"
    assert "unit 1: object storage failed after run.storage_retry_seconds=1 s; the unit goes back to the queue" in err
    assert ("error: unit 1 could not read or write object storage 2 times, each after retrying for "
            "run.storage_retry_seconds=1 s (run.max_retries=1); last error: GenericError") in err
    assert "Traceback" not in err
