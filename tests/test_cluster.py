"""The job on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: several raylets on
this machine, GPUs declared logically): it spreads over the nodes, ``gpus_per_worker`` places one
actor per GPU (or several per GPU when fractional), a driver SIGKILLed mid-job resumes to the same
arrays, actors that cannot be placed end the job with what is missing, and a worker that sees
another dataset stops the job naming its node. Node loss mid-unit is in test_faults.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]

from conftest import read_arrays, saliency_only  # noqa: E402
from distributed_attr.runner import AttributionWorker, JobError, run, worker_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]




def start_cluster(*nodes):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80_000_000,
                                                             "include_dashboard": False})
    for n in nodes:
        cluster.add_node(object_store_memory=80_000_000, **n)
    cluster.wait_for_nodes()
    return cluster


SUPPORT = str(Path(__file__).resolve().parent / "support")


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head with no CPUs and two worker nodes with one CPU and one (logical) GPU each. Their
    workers can import the slow test model (tests/support), which keeps a job running long
    enough to kill its driver in the middle."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([SUPPORT, str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.syspath_prepend(SUPPORT)
        cluster = start_cluster({"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "num_gpus": 1})
        yield cluster
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def node_of(worker: str) -> str:
    return worker.split(":")[1]


def test_auto_gives_one_actor_per_gpu_and_the_job_spreads_over_the_nodes(gpu_cluster, parquet_dir, make_config,
                                                                         tmp_path, reference):
    cfg = saliency_only(parquet_dir, tmp_path / "s.zarr", num_workers=2, cpus_per_worker=0.5)
    s = run(cfg, address=gpu_cluster.address, progress=False)
    assert s.units_done == 6
    nodes = {node_of(w) for w in s.unit_workers.values()}
    assert len(nodes) == 2, f"one actor per GPU means one per node: {s.unit_workers}"
    assert {w.rsplit(":", 1)[1] for w in s.unit_workers.values()} == {"cpu"}  # no CUDA on this machine
    got = read_arrays(tmp_path / "s.zarr")
    for k in reference:
        np.testing.assert_array_equal(reference[k], got[k], err_msg=k)


def test_actors_that_cannot_be_placed_end_the_job_saying_what_is_missing(gpu_cluster, parquet_dir, make_config,
                                                                         tmp_path):
    cfg = saliency_only(parquet_dir, tmp_path / "s.zarr", num_workers=1, gpus_per_worker=2,
                placement_timeout=4)
    with pytest.raises(JobError, match=r"1 of 1 actor\(s\) not started after \d+ s; each asks for "
                                       r"\{'CPU': 1.0, 'GPU': 2.0\} on one node; the cluster has .*'GPU': 2.0.*its nodes offer "
                                       r"\[.*'GPU': 1.0.*'GPU': 1.0.*\].*placement_timeout"):
        run(cfg, address=gpu_cluster.address, progress=False)


def test_a_driver_killed_mid_job_resumes_to_the_same_arrays(gpu_cluster, parquet_dir, make_config, tmp_path,
                                                            reference):
    import json

    store = tmp_path / "s.zarr"
    cfg = saliency_only(parquet_dir, store, num_workers=2, cpus_per_worker=0.5)
    # the digits model, slowed down (0.3 s per batch of 8) so that units finish one by one
    cfg["model"] = {"kind": "callable", "name": "fault_models:marked_digits",
                    "kwargs": {"marker_dir": str(tmp_path), "delay": 0.3}}
    code = ("import json, sys; from distributed_attr.runner import run; "
            "run(json.loads(sys.argv[1]), address=sys.argv[2], progress=False)")
    env = dict(os.environ)
    driver = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg), gpu_cluster.address], env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if 1 <= int(zarr.open_group(str(store), mode="r")["units/done"][:].sum()) < 6:
                    break
            except Exception:
                pass  # not created yet
            time.sleep(0.05)
        assert driver.poll() is None, "the driver finished before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    done = int(zarr.open_group(str(store), mode="r")["units/done"][:].sum())
    assert 1 <= done < 6
    s = run(cfg, address=gpu_cluster.address, resume=True, progress=False)  # the dead driver's lease is taken over
    assert s.units_done == 6 and s.units_this_run == 6 - done
    got = read_arrays(store)
    for k in reference:
        np.testing.assert_array_equal(reference[k], got[k], err_msg=k)


def test_fractional_gpus_pack_several_replicas_onto_one_gpu(parquet_dir, make_config, tmp_path, reference,
                                                           gpu_cluster):
    gpu_cluster.shutdown()  # this test needs one GPU node beside a CPU-only one (the fixture's is done)
    cluster = start_cluster({"num_cpus": 2, "num_gpus": 1}, {"num_cpus": 2})
    try:
        gpu_node = next(n for n in cluster.list_all_nodes() if n._ray_params.num_gpus)
        cfg = saliency_only(parquet_dir, tmp_path / "s.zarr", num_workers=2, gpus_per_worker=0.5)
        s = run(cfg, address=cluster.address, progress=False)
    finally:
        cluster.shutdown()
    assert {node_of(w) for w in s.unit_workers.values()} == {gpu_node.node_id[:12]}, s.unit_workers
    assert len({w.split(":")[2] for w in s.unit_workers.values()}) == 2, "two replicas share the GPU"
    got = read_arrays(tmp_path / "s.zarr")
    for k in reference:
        np.testing.assert_array_equal(reference[k], got[k], err_msg=k)


def test_an_actor_uses_cuda_only_when_ray_gave_it_a_gpu():
    assert worker_device([], True) == "cpu"  # Ray 2.60 no longer hides GPUs from num_gpus=0 actors
    assert worker_device([0], False) == "cpu"
    assert worker_device([0], True) == "cuda"


def test_a_worker_that_sees_another_dataset_stops_the_job_naming_its_node(parquet_dir, make_config, tmp_path):
    from distributed_attr.config import Config
    from distributed_attr.io.sources import open_source

    cfg = Config.from_dict(saliency_only(parquet_dir, tmp_path / "s.zarr"))
    driver_view = open_source(cfg.data).fingerprint()
    other = {**driver_view, "sha256": "0" * 16,
             "listing": [[driver_view["listing"][0][0], 1, 2, 3]] + driver_view["listing"][1:]}
    with pytest.raises(JobError, match=r"node \S+ \(local\) sees another dataset .* file 'train-00000-of-00003.parquet' changed"):
        AttributionWorker(cfg.to_dict(), 1, other)
    AttributionWorker(cfg.to_dict(), 1, driver_view)  # the same files: fine


def test_auto_counts_gpu_node_types_the_autoscaler_can_still_add(tmp_path):
    """On an autoscaling cluster that has no GPU node up yet, `auto` must not resolve to 0 (CPU-only
    actors would later be packed onto the GPU nodes): the launcher's node types, which it copies
    to the head as ~/ray_bootstrap_config.yaml, say whether GPU nodes can come."""
    import yaml

    from distributed_attr.runner import _autoscaler_offers_gpus

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (tmp_path / "boot.yaml").write_text(yaml.safe_dump(cfg))
    assert _autoscaler_offers_gpus(str(tmp_path / "boot.yaml"))
    for t in cfg["available_node_types"].values():
        (t.get("resources") or {}).pop("GPU", None)
    (tmp_path / "cpu-only.yaml").write_text(yaml.safe_dump(cfg))
    assert not _autoscaler_offers_gpus(str(tmp_path / "cpu-only.yaml"))
    assert not _autoscaler_offers_gpus(str(tmp_path / "missing.yaml"))


def test_the_waiting_message_tells_starting_actors_from_missing_resources():
    """During the demo's transformer stage, on a busy machine, the message said the cluster had
    "{} available" while the two actors only took long to import torch: they held the CPUs
    themselves. The message now says so when the actors' own asks add up to what is in use."""
    from distributed_attr.runner import _probably_starting

    assert _probably_starting({"CPU": 1.0}, 2, {}, {"CPU": 2.0})
    assert _probably_starting({"CPU": 1.0, "GPU": 0.25}, 4, {"CPU": 4.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0})
    # something else holds one CPU: the actors cannot all be placed
    assert not _probably_starting({"CPU": 1.0}, 2, {"CPU": 1.0}, {"CPU": 2.0})
    # nothing is in use: the asks cannot be met at all (a GPU on a CPU cluster)
    assert not _probably_starting({"CPU": 1.0, "GPU": 1.0}, 1, {"CPU": 2.0}, {"CPU": 2.0})
