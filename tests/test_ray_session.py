"""ray_session: a local Ray bound to loopback, stopped on exit and after a SIGKILLed driver; an
instance someone else started is left alone. Two Ray starts in all (~15 s each on 2 cores)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import psutil  # noqa: E402  (Ray vendors it and puts it on sys.path)

from distributed_attr.ray_session import non_loopback_listeners, ray_session  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))


def _handles(pids) -> list[psutil.Process]:
    """Handles taken while the processes live: is_running() then also sees through pid reuse."""
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return alive


def test_the_check_sees_a_socket_on_all_interfaces():
    # the loopback check below would pass vacuously if it could not see a wildcard bind
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert non_loopback_listeners([os.getpid()]) == {os.getpid(): [f"0.0.0.0:{s.getsockname()[1]}"]}


def test_local_session_binds_loopback_is_left_alone_when_nested_and_stops_on_exit():
    assert not ray.is_initialized()
    with ray_session(None, num_cpus=1) as s:
        assert s.started and s.watchdog
        ray.get(ray.remote(lambda: 1).remote())  # a worker up as well
        kids = _handles(p.pid for p in psutil.Process().children(recursive=True))
        names = {p.name() for p in kids}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        # (1) every port Ray opened is on loopback (a plain ray.init(address="local") puts gcs,
        # raylet and workers on all interfaces and the agents on the host's outward IP)
        listening = [c for p in kids for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert len(listening) >= 6
        assert non_loopback_listeners([p.pid for p in kids]) == {}

        # (4) Ray initialised already: the nested session neither starts nor stops anything
        with ray_session(None, num_cpus=1) as inner:
            assert not inner.started and inner.pids == ()
        assert ray.is_initialized()
        ray.get(ray.remote(lambda: 2).remote())
        core = [p for p in kids if p.name() != "ray::IDLE"]  # workers come and go
        assert len(_alive(core)) == len(core)

    assert not ray.is_initialized()
    # (2) gone after the exit, the watchdog too
    assert _wait_gone(kids + _handles([s.watchdog]), 15) == []


def test_a_joined_cluster_outlives_the_session_and_its_sigkilled_driver_takes_ray_along(monkeypatch):
    code = ("import time, ray\nfrom distributed_attr.ray_session import ray_session\n"
            "with ray_session(None, num_cpus=1) as s:\n"
            "    print(ray.get_runtime_context().gcs_address, *s.pids, s.watchdog, flush=True)\n"
            "    time.sleep(60)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line.strip(), "the driver printed nothing"
        gcs, *pids, watchdog = line.split()
        procs = _handles(map(int, pids + [watchdog]))
        assert {"raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name() for p in procs}
        core = [p for p in procs if p.name() != "ray::IDLE"]  # workers come and go

        # (c) joining by address, then leaving, disconnects only. Joining a loopback instance
        # needs Ray's single-machine mode in the joining process: otherwise Ray rewrites
        # 127.0.0.1 to the host's outward IP, where nothing listens.
        monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        with ray_session(gcs) as joined:
            assert not joined.started
            assert ray.get(ray.remote(lambda: 3).remote()) == 3
        assert not ray.is_initialized()
        assert len(_alive(core)) == len(core)
    finally:
        driver.kill()
        driver.wait()
    # (3) SIGKILLed driver: without the watchdog the agents lived ~60 s here; it takes them in
    # ~GRACE_S, then exits
    assert _wait_gone(procs, 20) == []
