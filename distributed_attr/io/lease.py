"""One driver per store: a lease file inside the store, kept alive by a heartbeat.

Why: two drivers on one store both compute everything, and a second driver started with
``--overwrite`` would delete the store of a job that is still running. The lease says who drives
the store (owner id, host, pid, start, last heartbeat). A second driver is refused while the lease
is alive; it may take the lease over once it has expired, i.e. when no heartbeat came for
``ttl`` seconds, or at once when the owner ran on this host and its process is gone (a SIGKILLed
driver, so that ``--resume`` right after a crash does not have to wait).

The lease is a Zarr group, ``<store>/lease``, whose attributes are the lease: anyone can read it
(``zarr.open_group(store)["lease"].attrs``), and zarr, xarray and our own listings see a valid node
rather than an unknown file (zarr warns about those).

Atomicity on a local or shared POSIX file system: the lease is written into a fresh temporary
folder, then renamed to ``lease`` (a rename onto an existing non-empty folder fails: exactly one
creator wins); it is refreshed by write-to-temp + ``os.replace`` (readers never see half a file);
an expired lease is taken over by first renaming it aside (exactly one renamer wins; a loser finds
it gone and tries again). Object stores get the same protocol from conditional writes
(``If-None-Match: *`` to create, ``If-Match: <etag>`` to refresh or take over), through obstore:
exactly one creator wins, and a refresh or takeover based on a stale read fails.

A refresh that fails (the server slow or unreachable, a full disk) is tried again every few
seconds, and the lease is given up only when it is at risk: when the last successful heartbeat is
``RISK_FRACTION`` of the ttl old, well before another driver could take the store over. A
conditional PUT whose answer was lost may still have landed, so a refresh refused as stale reads
the lease back: if it is still ours (our owner id), it is kept.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .storage import call_with_retries, is_remote, local_path, object_store

#: the lease group's name inside the store
LEASE_NAME = "lease"
_META = "zarr.json"
#: seconds without a heartbeat after which another driver may take the store over
#: (``run.lease_seconds``)
DEFAULT_TTL = 180.0
#: a driver whose last successful heartbeat is this fraction of the ttl old stops (``LeaseError``)
RISK_FRACTION = 0.8
#: most seconds between tries of a refresh that failed
RETRY_EVERY = 2.0


class LeaseError(RuntimeError):
    """Another driver holds the store, or this driver lost its lease."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    host: str
    pid: int
    started: str
    heartbeat: float  # unix time of the last heartbeat
    ttl: float

    @classmethod
    def parse(cls, raw: bytes | str) -> "LeaseInfo":
        try:
            attrs = json.loads(raw)["attributes"]
            return cls(**{k: attrs[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            # A lease we cannot parse is treated as expired: half-written by a crash, or damaged;
            # refusing forever would lock the store for good.
            return cls(owner="<unreadable>", host="", pid=-1, started="", heartbeat=0.0, ttl=0.0)

    def metadata(self) -> str:
        """The lease as the ``zarr.json`` of a Zarr v3 group."""
        return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": asdict(self)})

    def age(self) -> float:
        return time.time() - self.heartbeat

    def alive(self) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False  # its driver is gone: no need to wait for the heartbeat to lapse
        return self.age() < self.ttl

    def describe(self) -> str:
        return (f"driver pid {self.pid} on host {self.host!r} (started {self.started}, "
                f"last heartbeat {self.age():.0f} s ago; the lease expires {self.ttl:.0f} s after it)")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# -- where the lease lives: two backends with the same four atomic operations ----------------------

class _LocalLease:
    """On a POSIX file system: folder renames are the atomic steps (see the module docstring).
    The token identifying a version of the lease is its owner id."""

    def __init__(self, store: str):
        self.root = Path(local_path(store))
        self.path = self.root / LEASE_NAME

    def read(self) -> tuple[LeaseInfo | None, Any]:
        try:
            info = LeaseInfo.parse((self.path / _META).read_text())
        except (FileNotFoundError, NotADirectoryError):
            if self.path.exists() and time.time() - self.path.stat().st_mtime < 10:
                time.sleep(0.2)  # a lease folder being written by another taker this instant
                return self.read()
            return (None, None) if not self.path.exists() else (LeaseInfo.parse(""), "<unreadable>")
        return info, info.owner

    def create(self, info: LeaseInfo) -> Any:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".lease-{info.owner}"
        tmp.mkdir()
        (tmp / _META).write_text(info.metadata())
        try:
            os.rename(tmp, self.path)  # fails when ``lease`` exists (non-empty): one creator wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        return info.owner

    def take_over(self, info: LeaseInfo, token: Any) -> Any:
        """Replace the expired lease ``token`` by ``info``: move it aside (one mover wins); if what
        we moved is not the version we judged expired, put it back and give up this round."""
        aside = self.root / f".lease-expired-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        try:
            moved = LeaseInfo.parse((aside / _META).read_text())
        except OSError:
            moved = LeaseInfo.parse("")
        if moved.owner != token:
            try:
                os.rename(aside, self.path)
                return None
            except OSError:
                pass
        shutil.rmtree(aside, ignore_errors=True)
        return self.create(info)

    def refresh(self, info: LeaseInfo, token: Any) -> Any:
        current, now = self.read()
        if now != token:
            return None
        tmp = self.path / f"{_META}.{info.owner}.tmp"
        tmp.write_text(info.metadata())
        os.replace(tmp, self.path / _META)
        return token

    def delete(self, token: Any) -> None:
        _, now = self.read()
        if now == token:
            shutil.rmtree(self.path, ignore_errors=True)


class _ObjectLease:
    """On object storage: conditional PUTs. The token is the object's ETag."""

    def __init__(self, store: str, storage_options: dict[str, Any] | None):
        self.store = object_store(store, storage_options)
        self.key = f"{LEASE_NAME}/{_META}"

    def read(self) -> tuple[LeaseInfo | None, Any]:
        import obstore

        try:
            got = obstore.get(self.store, self.key)
        except FileNotFoundError:
            return None, None
        return LeaseInfo.parse(bytes(got.bytes())), got.meta["e_tag"]

    def _put(self, info: LeaseInfo, mode: Any) -> Any:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return obstore.put(self.store, self.key, info.metadata().encode(), mode=mode)["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            return None

    def create(self, info: LeaseInfo) -> Any:
        return self._put(info, "create")

    def take_over(self, info: LeaseInfo, token: Any) -> Any:
        return self._put(info, {"e_tag": token})

    def refresh(self, info: LeaseInfo, token: Any) -> Any:
        return self._put(info, {"e_tag": token})

    def delete(self, token: Any) -> None:
        import obstore

        _, now = self.read()
        if now == token:  # object stores have no conditional delete; the window is one round trip
            obstore.delete(self.store, self.key)


def _backend(store: str, storage_options: dict[str, Any] | None = None) -> Any:
    return _ObjectLease(store, storage_options) if is_remote(store) else _LocalLease(store)


def lease_info(store: str | Path, storage_options: dict[str, Any] | None = None) -> LeaseInfo | None:
    """The lease of a store, or None when nobody holds one."""
    return _backend(str(store), storage_options).read()[0]


class StoreLease:
    """A held lease. ``acquire`` takes it (or raises ``LeaseError``); ``start_heartbeat`` keeps it
    alive from a daemon thread; ``check`` raises if another driver took it over meanwhile;
    ``release`` removes it. Also a context manager."""

    def __init__(self, store: str, backend: Any, info: LeaseInfo, token: Any):
        self.store = store
        self.backend = backend
        self.info = info
        self.token = token
        self.lost: str | None = None
        #: the last refresh's error while refreshes fail (the lease is kept until it is at risk)
        self.failing: str | None = None
        self._stop = threading.Event()
        #: set once the heartbeat thread has tried its first refresh (``check`` judges the risk after it)
        self._beaten = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking the lease ------------------------------------------------------------------------
    @classmethod
    def acquire(cls, store: str | Path, ttl: float = DEFAULT_TTL,
                storage_options: dict[str, Any] | None = None) -> "StoreLease":
        store = str(store)
        backend = _backend(store, storage_options)
        info = LeaseInfo(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                         started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         heartbeat=time.time(), ttl=float(ttl))
        for _ in range(8):  # bounded: each round either wins, is refused, or lost a race to another taker
            # a conditional write that timed out may have landed: tried again, it finds our own lease
            token = call_with_retries(lambda: backend.create(info))
            if token is not None:
                return cls(store, backend, info, token)
            current, their = backend.read()
            if current is None:
                continue  # released between our two calls: try again
            if current.owner == info.owner:  # ours: an earlier try landed although its answer was lost
                return cls(store, backend, current, their)
            if current.alive():
                raise LeaseError(f"the store {store!r} is in use by another {current.describe()}. "
                                 "Wait for that job to finish, or stop it first.")
            token = call_with_retries(lambda: backend.take_over(info, their))
            if token is not None:
                return cls(store, backend, info, token)
        raise LeaseError(f"could not take the lease of {store!r}: other drivers keep taking it")

    # -- keeping it ------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Refresh the lease; records ``lost`` when another driver owns it now."""
        info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
        token = self.backend.refresh(info, self.token)
        if token is None:
            current, their = self.backend.read()
            if current is not None and current.owner == self.info.owner:
                # still ours: an earlier refresh landed although its answer was lost (a timeout)
                self.info, self.token = current, their
                return
            self.lost = (f"another driver took the store over ({current.describe()})" if current
                         else "the lease was removed")
            return
        self.info, self.token = info, token

    def at_risk(self) -> bool:
        """Whether the last successful heartbeat is so old that another driver may soon take over."""
        return self.info.age() >= RISK_FRACTION * self.info.ttl

    def start_heartbeat(self) -> "StoreLease":
        interval = max(0.05, self.info.ttl / 4)

        def beat() -> None:
            # the first refresh at once: the work between taking the lease and starting the
            # heartbeat (clearing or checking a large store) must not count as failed refreshes
            wait = 0.0
            while not self._stop.wait(wait):
                try:
                    self.heartbeat()
                    # the next one an interval after this one's stamp, also when it took long to land
                    self.failing, wait = None, max(0.0, interval - self.info.age())
                except Exception as exc:  # a slow or unreachable server, a full disk: try again soon
                    if self.failing is None:
                        print(f"warning: the lease of the store {self.store!r} could not be refreshed "
                              f"({type(exc).__name__}); trying again until it is at risk, "
                              f"{RISK_FRACTION * self.info.ttl:.0f} s after the last heartbeat", file=sys.stderr)
                    self.failing = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    wait = min(interval, RETRY_EVERY)
                    if self.at_risk():
                        self.lost = self._at_risk_message()
                self._beaten.set()
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def _at_risk_message(self) -> str:
        return (f"the lease could not be refreshed for {self.info.age():.0f} s (it expires "
                f"{self.info.ttl:.0f} s after the last heartbeat, run.lease_seconds)"
                + (f"; last error: {self.failing}" if self.failing else ""))

    def check(self) -> None:
        """Raise ``LeaseError`` if this driver no longer holds the store, or may lose it any moment
        (refreshes have failed for ``RISK_FRACTION`` of the ttl)."""
        if self.lost is None and self._thread is not None and self._beaten.is_set() and self.at_risk():
            self.lost = self._at_risk_message()
        if self.lost:
            raise LeaseError(f"lost the lease of the store {self.store!r}: {self.lost}; "
                             "stopping so that two drivers never write one store")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current, token = self.backend.read()
            if current is not None and current.owner == self.info.owner:  # ours, whatever its version
                self.backend.delete(token)
        except Exception:  # best effort: an unreleased lease expires after its ttl
            pass

    def __enter__(self) -> "StoreLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
