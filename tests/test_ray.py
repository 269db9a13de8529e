"""The job on a local Ray instance: actors, fault tolerance, cluster config."""
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

from distributed_attr.runner import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = str(ROOT / "tests" / "support")


@pytest.fixture(scope="module")
def local_ray():
    from distributed_attr.ray_session import ray_session

    # actors import the marked test model (tests/support/fault_models.py) by name: its folder on
    # their path, set before Ray starts its workers
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")]))
        mp.syspath_prepend(SUPPORT)
        with ray_session(None, num_cpus=2, object_store_memory=150_000_000):  # loopback only, as the job's
            yield


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("maps/saliency", "maps/integrated_gradients", "target", "ok", "image")}


def test_actors_write_the_same_store_as_the_in_process_loop(tmp_path, parquet_dir, make_config, local_ray):
    run(make_config(parquet_dir, tmp_path / "local.zarr"), progress=False)
    s = run(make_config(parquet_dir, tmp_path / "ray.zarr", num_workers=2), progress=False)
    assert s.units_done == 6 and s.workers == 2
    a, b = _arrays(tmp_path / "local.zarr"), _arrays(tmp_path / "ray.zarr")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the actors' results carry the checksums of what they wrote, and the commit records them
    checksums = [zarr.open_group(str(tmp_path / p), mode="r")["units/checksum"][:] for p in ("local.zarr", "ray.zarr")]
    assert (checksums[1] >= 0).all()
    np.testing.assert_array_equal(*checksums)


def test_a_killed_actor_loses_nothing_and_writes_every_image_once(tmp_path, parquet_dir, make_config, local_ray):
    """``ray.kill`` (restart allowed) of the actor that holds unit 2, while that actor is inside a
    unit: the model leaves a marker named by its actor id from its forward pass and then sleeps
    (once, when the marker is new), so the kill lands mid-unit however fast the machine is (a kill after a fixed sleep found the
    unit finished on a quiet machine: 0 retries)."""
    run(make_config(parquet_dir, tmp_path / "ref.zarr"), progress=False)
    markers = tmp_path / "markers"
    markers.mkdir()
    killed, inside = [], []

    def kill_mid_unit(unit, actor):
        # Ray restarts the actor and the runner resubmits the unit (and whatever else that actor
        # had in flight).
        if unit == 2 and not killed:
            killed.append(unit)
            mine = markers / actor._actor_id.hex()
            mine.unlink(missing_ok=True)  # the actor's next forward pass writes it anew and sleeps

            def when_inside_a_unit():
                deadline = time.monotonic() + 120
                while not mine.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if mine.exists():
                    inside.append(unit)
                    ray.kill(actor, no_restart=False)

            threading.Thread(target=when_inside_a_unit, daemon=True).start()

    cfg = make_config(parquet_dir, tmp_path / "crash.zarr", num_workers=2, unit_size=16)
    cfg["model"] = {"kind": "callable", "name": "fault_models:marked_digits",
                    "kwargs": {"marker_dir": str(markers), "delay": 0.3, "by_actor": True}}
    s = run(cfg, progress=False, _after_dispatch=kill_mid_unit)
    assert killed == [2] and inside == [2], "the actor holding unit 2 was never seen inside a unit"
    assert s.retries >= 1, "the kill should have cost at least one unit a retry"
    assert s.units_done == s.units == 6 and not s.failures
    a, b = _arrays(tmp_path / "ref.zarr"), _arrays(tmp_path / "crash.zarr")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(np.sort(b["image"]), np.arange(96))  # each image exactly once


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    broken = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 3  # a typo the schema must catch
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))
