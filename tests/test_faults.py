"""Actor and node loss *while a unit runs*, on real Ray processes (issue: survive actor and node loss).

The model (tests/support/fault_models.py) leaves a marker ``<node>-<pid>`` when an actor is inside
a unit's forward pass and then sleeps, so the test kills exactly a process that is mid-unit, or
removes exactly the node it runs on. Before the fix, a killed actor's unit was resent at once to
the restarting actor, every immediate "actor is restarting" answer counted as an attempt, and the
job failed ("unit N lost its actor 4 times"): 4 of 4 tries."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]

from distributed_attr.ray_session import ray_session  # noqa: E402
from distributed_attr.runner import run  # noqa: E402

SUPPORT = str(Path(__file__).resolve().parent / "support")


@pytest.fixture(scope="module", autouse=True)
def importable_support():
    """Actors import the test model by name: put its folder on their (and our) path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")]))
        mp.syspath_prepend(SUPPORT)
        yield


def config(make_config, data, store, marker_dir="", delay=0.0, **run_over):
    cfg = make_config(data, store, **run_over)
    cfg["methods"] = {"saliency": {}}
    cfg["model"] = {"kind": "callable", "name": "fault_models:marked_digits",
                    "kwargs": {"marker_dir": str(marker_dir), "delay": delay}}
    return cfg


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("maps/saliency", "target", "ok", "image", "source_key")}


def when_a_unit_runs(marker_dir: Path, action, skip=(), timeout=120.0):
    """Call ``action(node_id, pid)`` once, for the first actor seen inside a unit; a thread with a
    bounded loop, so a test that never sees a marker ends with the job instead of hanging."""
    done: list[tuple[str, int]] = []

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done:
            for name in os.listdir(marker_dir):
                node, pid = name.rsplit("-", 1)
                if int(pid) != os.getpid() and node not in skip:
                    done.append((node, int(pid)))
                    action(node, int(pid))
                    return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return done, t


@pytest.fixture(scope="module")
def reference(importable_support, tmp_path_factory, parquet_dir):
    from conftest import base_config

    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    # fault-free and sequential (no decode threads): the faulted runs use the overlapped stages
    run(config(base_config, parquet_dir, path, decode_workers=0), progress=False)
    return arrays(path)


def check_complete(summary, store, reference):
    assert summary.units_done == summary.units == 6 and not summary.failures
    got = arrays(store)
    for k in reference:
        np.testing.assert_array_equal(reference[k], got[k], err_msg=k)
    np.testing.assert_array_equal(got["image"], np.arange(96))  # every image written, once each


def test_an_actor_killed_mid_unit_is_survived(tmp_path, parquet_dir, make_config, reference):
    markers = tmp_path / "markers"
    markers.mkdir()
    with ray_session(None, num_cpus=2, object_store_memory=150_000_000):
        killed, watcher = when_a_unit_runs(markers, lambda node, pid: os.kill(pid, signal.SIGKILL))
        s = run(config(make_config, parquet_dir, tmp_path / "s.zarr", markers, delay=0.3, num_workers=2,
                       max_retries=1), progress=False)
        watcher.join(timeout=5)
    assert killed, "no actor was seen inside a unit"
    assert s.retries == 1, "exactly the one execution that was killed counts"
    check_complete(s, tmp_path / "s.zarr", reference)


def test_a_node_removed_mid_unit_leaves_its_units_to_the_other_node(tmp_path, parquet_dir, make_config, reference):
    from ray.cluster_utils import Cluster

    markers = tmp_path / "markers"
    markers.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100_000_000,
                                                             "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=100_000_000) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        def remove(node_id, pid):
            victim = next(n for n in nodes if n.node_id == node_id)
            cluster.remove_node(victim, allow_graceful=False)

        removed, watcher = when_a_unit_runs(markers, remove)
        s = run(config(make_config, parquet_dir, tmp_path / "s.zarr", markers, delay=0.3, num_workers=2,
                       actor_timeout=120), progress=False)
        watcher.join(timeout=5)
        writers = {n for n in os.listdir(markers)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "no node was seen running a unit"
    assert len({w.rsplit("-", 1)[0] for w in writers}) == 2, "both nodes worked before one left"
    check_complete(s, tmp_path / "s.zarr", reference)
