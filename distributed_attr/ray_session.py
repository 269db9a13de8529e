"""Start or join Ray for one job, and make sure that what the job started stops with it.

``with ray_session(address, num_cpus=...):`` is the one place the jobs get Ray from (see
docs/ray.md). Three cases:

- Ray is initialised already (a test fixture, a notebook, an enclosing job): use it, touch nothing.
- ``address`` given (a cluster address or "auto"): join it; on exit ``ray.shutdown()``, which
  only disconnects this driver and leaves the cluster running.
- otherwise: start a private local instance bound to loopback, stopped on exit by
  ``ray.shutdown()`` -- which runs on a normal exit, an exception and Ctrl-C alike -- and guarded
  by a watchdog process that cleans up when the driver dies without running it (SIGKILL, OOM
  killer, a SIGTERM with no handler).

This module imports nothing but the standard library at the top: the watchdog loads this file
alone (not the package, which pulls in torch) and must start in a fraction of a second.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

log = logging.getLogger(__name__)

OBJECT_STORE_MEMORY = 200 * 1024 * 1024  # what runner.py always used: the maps pass through it briefly
POLL_S = 0.5  # how often the watchdog looks at the driver
GRACE_S = 3.0  # SIGTERM, then this long before SIGKILL (agents of a dead raylet ignore SIGTERM)
READY_TIMEOUT_S = 15.0  # the watchdog's start (python + psutil import) on a busy machine


@dataclass(frozen=True)
class RaySession:
    """What ``ray_session`` did: ``started`` is True when it started a local instance, whose
    processes (children of this driver) are ``pids``; ``watchdog`` is the guard's pid."""

    started: bool = False
    pids: tuple[int, ...] = field(default_factory=tuple)
    watchdog: int | None = None


@contextmanager
def ray_session(address: str | None, *, num_cpus: int | None = None,
                object_store_memory: int | None = None) -> Iterator[RaySession]:
    """Ray for the duration of a ``with`` block; see the module docstring for the three cases.
    ``num_cpus`` (default: this machine's) and ``object_store_memory`` (default 200 MiB) apply
    only to a local instance this call starts."""
    import ray

    if ray.is_initialized():  # someone else owns it: their instance, their shutdown
        yield RaySession()
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield RaySession()
        finally:
            ray.shutdown()  # a driver that joined only disconnects; the cluster keeps running
        return

    before = {p.pid for p in _children()}
    try:
        _init_local(num_cpus or os.cpu_count() or 1, object_store_memory or OBJECT_STORE_MEMORY)
        # Ray's processes are the driver's new descendants (gcs, raylet, monitors; the agents
        # and workers under the raylet). The watchdog also adopts their later descendants.
        procs = [p for p in _children() if p.pid not in before]
        exposed = non_loopback_listeners([p.pid for p in procs])
        if exposed:  # relies on a Ray internal (see _init_local): say so loudly if it broke
            log.warning("Ray processes listen beyond loopback: %s", exposed)
        watchdog = _start_watchdog(procs)
    except BaseException:  # incl. Ctrl-C during the seconds ray.init takes
        ray.shutdown()
        raise
    try:
        yield RaySession(True, tuple(p.pid for p in procs), watchdog.pid if watchdog else None)
    finally:
        try:
            ray.shutdown()
        finally:
            _stop_watchdog(watchdog)


def _init_local(num_cpus: int, object_store_memory: int) -> None:
    """A fresh instance (address="local": even when a `ray start` cluster runs on this host)
    whose every port listens on loopback only.

    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: init() passes the value through
    ``services.resolve_ip_for_localhost``, which replaces a loopback address by the host's
    outward IP, so the agents then listen on that IP and gcs, raylet and workers on all
    interfaces. Ray 2.60 has no RAY_NODE_IP_ADDRESS variable. What works is Ray's own
    single-machine mode (the default on macOS and Windows, to avoid firewall prompts):
    with ``ray_constants.ENABLE_RAY_CLUSTER`` False the node's IP is 127.0.0.1, and gcs, raylet,
    agents, metrics servers and workers all bind that IP. The constant is read at call time,
    so it is switched off only for the duration of init() (afterwards Ray takes the IP from
    the running node, and a later ``address=`` join in this process is unaffected).
    """
    import ray
    import ray._private.ray_constants as ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False, configure_logging=False, log_to_driver=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _children() -> list:
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    return psutil.Process().children(recursive=True)


def non_loopback_listeners(pids: list[int]) -> dict[int, list[str]]:
    """``{pid: ["ip:port", ...]}`` of the listening TCP sockets of ``pids`` that are not on a
    loopback address (an IPv4-mapped ``::ffff:127.0.0.1`` counts as loopback). Gone pids are
    skipped."""
    import ray  # noqa: F401
    import psutil

    out: dict[int, list[str]] = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        bad = [f"{c.laddr.ip}:{c.laddr.port}" for c in conns
               if c.status == psutil.CONN_LISTEN and not _is_loopback(c.laddr.ip)]
        if bad:
            out[pid] = bad
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


# ---------------------------------------------------------------------------------------------
# The SIGKILL guard. Ray gives gcs and raylet PR_SET_PDEATHSIG, so they die with the driver,
# but the raylet's children (DashboardAgent, RuntimeEnvAgent) notice only by polling and lived
# ~60 s after a SIGKILLed driver here (workers ~5 s). The watchdog is a separate process in its
# own session (so a Ctrl-C or a closed terminal does not take it down with the driver) that
# learns of the driver's end from EOF on its stdin (the kernel closes the pipe when the driver
# dies) or, should a forked child of the driver hold the pipe open, from polling the driver's
# pid; it then kills the Ray processes it was given and their descendants, and exits.


def _start_watchdog(procs: list) -> subprocess.Popen | None:
    import psutil

    me = psutil.Process()
    spec = {
        "driver": [me.pid, me.create_time()],
        "pids": [[p.pid, p.create_time()] for p in procs],
        "psutil_path": os.path.dirname(os.path.dirname(psutil.__file__)),  # Ray vendors psutil
    }
    # Load this file alone under -I (no cwd on sys.path, no PYTHONPATH): fast and unaffected
    # by whatever the job's working directory holds.
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('_ray_watchdog', sys.argv[1]);"
            " m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); m._watchdog(sys.argv[2])")
    wd = subprocess.Popen([sys.executable, "-I", "-c", code, os.path.abspath(__file__), json.dumps(spec)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    # Wait until it holds its process handles, so that a kill right after this returns is covered.
    ready, _, _ = select.select([wd.stdout], [], [], READY_TIMEOUT_S)
    if ready and wd.stdout.readline().strip() == b"ready":
        return wd
    log.warning("the Ray watchdog did not start: Ray processes may outlive a killed driver")
    wd.kill()
    wd.wait()
    return None


def _stop_watchdog(wd: subprocess.Popen | None) -> None:
    """Close the watchdog's stdin: it sweeps whatever ray.shutdown() left (normally nothing,
    so it exits at once) and exits; wait for it, bounded, so it is reaped."""
    if wd is None:
        return
    wd.stdin.close()
    try:
        wd.wait(timeout=GRACE_S + 5)
    except subprocess.TimeoutExpired:  # it ends by itself; leave it be
        pass
    wd.stdout.close()


def _watchdog(spec_json: str) -> None:
    """The watchdog process's main: wait for the driver's end, then kill what it left."""
    spec = json.loads(spec_json)
    sys.path.insert(0, spec["psutil_path"])
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's end stops it

    def handle(pid: int, created: float):
        try:
            p = psutil.Process(pid)
        except psutil.Error:
            return None
        # the same process, not a later one that got the pid (psutil then tracks that itself)
        return p if abs(p.create_time() - created) < 0.5 else None

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def with_descendants(procs: set) -> set:
        out = set()
        for p in procs:
            if alive(p):
                out.add(p)
                try:
                    out.update(p.children(recursive=True))
                except psutil.Error:
                    pass
        return out

    driver = handle(*spec["driver"])
    tracked = {p for p in (handle(*x) for x in spec["pids"]) if p}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while driver is not None and alive(driver):
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is done (it ran ray.shutdown()) or dead
        tracked = with_descendants(tracked)  # adopt workers the raylet started since
        if not tracked:
            return  # nothing left to guard (ray.shutdown() ran and the driver lives on)

    victims = with_descendants(tracked)
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 2.0)):
        for p in victims:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait_s
        while victims and time.monotonic() < deadline:
            victims = {p for p in victims if alive(p)}
            time.sleep(0.1)
        if not victims:
            return
