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
(``If-None-Match: *`` to create, ``If-Match: <etag>`` to refresh or take over).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: the lease group's name inside the store
LEASE_NAME = "lease"
_META = "zarr.json"
#: seconds without a heartbeat after which another driver may take the store over
DEFAULT_TTL = 60.0


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
    def read(cls, lease_dir: Path) -> "LeaseInfo | None":
        try:
            raw = json.loads((lease_dir / _META).read_text())["attributes"]
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, KeyError, TypeError):
            # A lease we cannot parse is treated as expired: it was half-written by a crash of
            # an older version, or damaged; refusing forever would lock the store for good.
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


def lease_info(store_dir: str | Path) -> LeaseInfo | None:
    """The lease of a store, or None when nobody holds one."""
    return LeaseInfo.read(Path(store_dir) / LEASE_NAME)


class StoreLease:
    """A held lease. ``acquire`` takes it (or raises ``LeaseError``); ``start_heartbeat`` keeps it
    alive from a daemon thread; ``check`` raises if another driver took it over meanwhile;
    ``release`` removes it. Also a context manager."""

    def __init__(self, store_dir: Path, info: LeaseInfo):
        self.store_dir = store_dir
        self.path = store_dir / LEASE_NAME
        self.info = info
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking the lease ------------------------------------------------------------------------
    @classmethod
    def acquire(cls, store_dir: str | Path, ttl: float = DEFAULT_TTL) -> "StoreLease":
        store_dir = Path(store_dir)
        store_dir.mkdir(parents=True, exist_ok=True)
        path = store_dir / LEASE_NAME
        now = time.time()
        info = LeaseInfo(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                         started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         heartbeat=now, ttl=float(ttl))
        for _ in range(8):  # bounded: each round either wins, is refused, or lost a race to another taker
            tmp = store_dir / f".lease-{info.owner}"
            tmp.mkdir()
            (tmp / _META).write_text(info.metadata())
            try:
                os.rename(tmp, path)  # fails when ``lease`` exists (non-empty): one creator wins
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                current = LeaseInfo.read(path)
                if current is None and path.exists() and time.time() - path.stat().st_mtime < 10:
                    time.sleep(0.2)  # a lease folder being written by another taker this instant
                    continue
                if current is not None and current.alive():
                    raise LeaseError(f"the store {str(store_dir)!r} is in use by another {current.describe()}. "
                                     "Wait for that job to finish, or stop it first.") from None
                cls._remove_expired(path, current)
                continue
            return cls(store_dir, info)
        raise LeaseError(f"could not take the lease of {str(store_dir)!r}: other drivers keep taking it")

    @staticmethod
    def _remove_expired(path: Path, expired: "LeaseInfo | None") -> None:
        """Move an expired lease aside; if what we moved is not the lease we judged expired (another
        taker replaced it in between), put it back and let the caller look again."""
        aside = path.with_name(f".lease-expired-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved = LeaseInfo.read(aside)
        if moved is not None and (expired is None or moved.owner != expired.owner):
            try:
                os.rename(aside, path)  # fails if a third driver created one meanwhile: theirs stays
                return
            except OSError:
                pass
        shutil.rmtree(aside, ignore_errors=True)

    # -- keeping it ------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Refresh the lease; records ``lost`` when another driver owns it now."""
        current = LeaseInfo.read(self.path)
        if current is None or current.owner != self.info.owner:
            self.lost = ("another driver took the store over" if current else "the lease file was removed") + (
                f" ({current.describe()})" if current else "")
            return
        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat": time.time()})
        tmp = self.path / f"{_META}.{self.info.owner}.tmp"
        tmp.write_text(self.info.metadata())
        os.replace(tmp, self.path / _META)

    def start_heartbeat(self) -> "StoreLease":
        interval = max(0.05, self.info.ttl / 4)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.heartbeat()
                except OSError as exc:  # a full or read-only disk: the lease will lapse; say why
                    self.lost = f"the lease could not be refreshed: {exc}"
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise ``LeaseError`` if this driver no longer holds the store."""
        if self.lost:
            raise LeaseError(f"lost the lease of the store {str(self.store_dir)!r}: {self.lost}; "
                             "stopping so that two drivers never write one store")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = LeaseInfo.read(self.path)
        if current is not None and current.owner == self.info.owner:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StoreLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
