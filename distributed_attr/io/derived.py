"""What derived results (the aggregation's, the evaluation's) know about the store they read,
whether they are still current, and how they are written so that no reader sees half of them.

The store state (``StoreState``): the root attribute ``generation`` (0 at creation, advanced by
every commit flush and every ``mark_not_done``, see ``AttributionStore``), ``store_id`` (new at
every creation, so a store recreated by ``--overwrite`` is another store), units done of all, and
whether a job holds the store's lease. Every output records it (``StoreState.record``):

* the store's ``aggregates`` group: in its attributes;
* the files in the outputs folder: each Parquet table in its schema metadata (key
  ``distributed_attr``), and the set's manifest, ``aggregate.json`` or ``evaluation.json``.

``output_statuses`` compares those records with the store now: current, partial (computed from
some units only, with ``--partial``), out of date (the store changed since), of unknown state
(written by an older version, which recorded nothing) or half-written. ``inspect`` and ``report``
say it on their first line; ``report`` refuses a half-written output.

Writes are atomic as seen by a reader:
* the ``aggregates`` group of a local store is written aside (``aggregates.tmp-<id>``), then
  renamed into place; on object storage it is written in place. Either way its attributes,
  with ``complete: true`` and the list of its ``arrays``, are written last, and readers require
  both (``GroupAside``);
* a set of files in the outputs folder is written into ``.<kind>.tmp-<id>/``, then its manifest
  is marked ``complete: false``, the files are moved into place (each ``os.replace`` is atomic),
  and the manifest is rewritten with ``complete: true`` last (``FilesAside``).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lease import lease_info
from .storage import is_remote, local_path
from .store import AttributionStore, Keys, StoreError, open_group, walk_arrays

#: the key of the store state in every Parquet table's schema metadata
PARQUET_KEY = b"distributed_attr"
#: the recorded keys (``StoreState.record``)
RECORD_KEYS = ("store_generation", "store_id", "units_done", "n_units", "partial")
#: the output sets in an outputs folder: kind -> (manifest, the files that belong to it, by
#: name or by prefix ending in "*"), and the command that writes them
OUTPUT_SETS = {
    "aggregate": ("aggregate.json", ("spectra.parquet", "summary.parquet", "spectra.png", "filter_effect.png")),
    "evaluation": ("evaluation.json", ("cutoff_curves*", "best_cutoffs.parquet", "rankings.parquet", "rankings.png",
                                       "cross_architecture.parquet", "cross_architecture.png")),
}
COMMANDS = {"aggregate": "aggregate", "evaluation": "evaluate", "aggregates": "aggregate"}


@dataclass(frozen=True)
class StoreState:
    """A store as a reader found it."""

    store: str
    generation: int
    store_id: str | None
    units_done: int
    n_units: int
    #: the driver that holds the store's lease, described, while a job runs; None otherwise
    job: str | None = None

    @property
    def complete(self) -> bool:
        return self.units_done >= self.n_units

    def record(self) -> dict[str, Any]:
        """What an output records of the store it read."""
        return {"store_generation": self.generation, "store_id": self.store_id, "units_done": self.units_done,
                "n_units": self.n_units, "partial": not self.complete}

    def require_complete(self, partial: bool, command: str) -> None:
        """Refuse (``StoreError``, one line) a store that is not complete, or that a job is still
        writing, unless ``partial``."""
        if partial:
            return
        done = f"{self.units_done} of {self.n_units} units done"
        if self.job:
            raise StoreError(
                f"{self.store!r} is being written by a running job ({self.job}); {done}. Wait for the job to "
                f"finish (`distributed-attr run CONFIG --resume` finishes a job that stopped), or pass --partial "
                f"(Python: partial=True) to {command} the units done so far, marked partial")
        if not self.complete:
            raise StoreError(
                f"{self.store!r} is not complete: {done}. Finish it with `distributed-attr run CONFIG --resume`, "
                f"or pass --partial (Python: partial=True) to {command} the {self.units_done} done units; "
                "every output is then marked partial")


def store_state(handle: AttributionStore, path: str | None = None, done: Any = None) -> StoreState:
    """The state of an open store: its generation (as read when the handle was opened, i.e.
    before ``units/done`` is read; see ``AttributionStore._advance_generation``), its done units
    (``done``: the done units the caller read with this handle, else read here) and the driver
    holding its lease, if any."""
    path = str(path or handle.path)
    generation = handle.generation
    done = int(len(handle.done_units() if done is None else done))
    job = None
    try:
        info = lease_info(path, handle.storage_options)
    except Exception:  # a store given as a group without a reachable path: no lease to read
        info = None
    if info is not None and info.alive():
        job = info.describe()
    return StoreState(path, generation, handle.attrs.get("store_id"), done, handle.n_units, job)


def _units(record: dict[str, Any]) -> str:
    return f"{record.get('units_done')} of {record.get('n_units')} units"


def title_note(record: dict[str, Any]) -> str:
    """What plots' titles and summaries add for a partial output ("" for a complete one)."""
    return f" [PARTIAL: {_units(record)}]" if record.get("partial") else ""


# -- statuses --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputStatus:
    """One derived output and how it stands against the store now."""

    what: str  # "aggregates" (the store's group), "aggregate" or "evaluation" (files in a folder)
    where: str
    #: "current", "partial", "out of date", "unknown" (no record: an older version), "half-written"
    state: str
    message: str
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "where": self.where, "state": self.state, "message": self.message,
                "record": self.record}


def _judge(what: str, where: str, record: dict[str, Any] | None, now: StoreState, label: str) -> OutputStatus:
    rerun = f"rerun `distributed-attr {COMMANDS[what]} {now.store}`"
    if record is None:
        return OutputStatus(what, where, "unknown",
                            f"{label} record no store state (written by an older version): {rerun} to be sure "
                            "they are current")
    changed = (record.get("store_generation") != now.generation or record.get("store_id") != now.store_id
               or record.get("units_done") != now.units_done)
    partial = " (partial)" if record.get("partial") else ""
    if changed:
        return OutputStatus(what, where, "out of date",
                            f"{label} are out of date: computed from {_units(record)}{partial} at store generation "
                            f"{record.get('store_generation')}, the store is now at generation {now.generation} with "
                            f"{now.units_done} of {now.n_units} units done: {rerun}", record)
    if record.get("partial"):
        return OutputStatus(what, where, "partial",
                            f"{label} are partial: computed from {_units(record)} (--partial)", record)
    return OutputStatus(what, where, "current", f"{label} are current (store generation {now.generation})", record)


def _record_of(attrs: dict[str, Any]) -> dict[str, Any] | None:
    if "store_generation" not in attrs:
        return None
    return {k: attrs.get(k) for k in RECORD_KEYS}


def aggregates_status(handle: AttributionStore, now: StoreState) -> OutputStatus | None:
    """The store's ``aggregates`` group: None when there is none."""
    group = handle.group
    if Keys.AGGREGATES not in group:
        return None
    where = f"{now.store}/{Keys.AGGREGATES}"
    half = (f"the {Keys.AGGREGATES} group of {now.store!r} is half-written ({{why}}): an aggregate was "
            f"interrupted, or is running now. Rerun `distributed-attr aggregate {now.store}`")
    try:
        agg = group[Keys.AGGREGATES]
        attrs = dict(agg.attrs)
        present = {name for name, _ in walk_arrays(agg)}
    except Exception as exc:  # a node's metadata unreadable (truncated zarr.json, ...): not whole
        why = f"a node's metadata cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return OutputStatus("aggregates", where, "half-written", half.format(why=why[:200]))
    if not attrs.get("complete"):
        if "store_generation" not in attrs and "units_aggregated" in attrs:
            # an older version: it wrote these attributes last, so the group is whole
            return _judge("aggregates", where, None, now, "the aggregates")
        return OutputStatus("aggregates", where, "half-written", half.format(why="no completion marker"))
    listed = [str(a) for a in attrs.get("arrays") or []]
    missing = [a for a in listed if a not in present]
    if missing:
        return OutputStatus("aggregates", where, "half-written",
                            half.format(why=f"{len(missing)} of its arrays are missing: {', '.join(missing[:3])}"))
    return _judge("aggregates", where, _record_of(attrs), now, "the aggregates")


def _belongs(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def files_status(out: Path, kind: str, now: StoreState) -> OutputStatus | None:
    """A set of files (``kind``: aggregate or evaluation) in an outputs folder; None when there is
    none."""
    manifest_name, patterns = OUTPUT_SETS[kind]
    manifest = out / manifest_name
    label = "the aggregate tables" if kind == "aggregate" else "the evaluation tables"
    try:
        names = [p.name for p in out.iterdir() if p.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    members = [n for n in names if _belongs(n, patterns)]
    if manifest_name not in names:
        if not members:
            return None
        return _judge(kind, str(out), None, now, label)
    try:
        record = json.loads(manifest.read_text())
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        return OutputStatus(kind, str(out), "half-written",
                            f"{label} in {out} are half-written ({manifest_name} is unreadable: {exc}): rerun "
                            f"`distributed-attr {COMMANDS[kind]} {now.store}`")
    if "store_generation" not in record and "complete" not in record:
        return _judge(kind, str(out), None, now, label)  # an older version's manifest, written last
    missing = [f for f in record.get("files_written") or [] if f not in names]
    if not record.get("complete") or missing:
        why = (f"{len(missing)} listed files are missing: {', '.join(missing[:3])}" if record.get("complete")
               else f"{manifest_name} says a write was under way")
        return OutputStatus(kind, str(out), "half-written",
                            f"{label} in {out} are half-written ({why}): a {COMMANDS[kind]} was interrupted, or is "
                            f"running now. Rerun `distributed-attr {COMMANDS[kind]} {now.store}`")
    return _judge(kind, str(out), _record_of(record), now, label)


def output_statuses(handle: AttributionStore, out: Path | None, now: StoreState | None = None) -> list[OutputStatus]:
    """Every derived output of a store: its ``aggregates`` group, and the aggregate and evaluation
    files in ``out`` (its outputs folder). Aggregate tables that record what the group records
    are not listed twice."""
    now = now or store_state(handle)
    found: list[OutputStatus] = []
    group = aggregates_status(handle, now)
    if group is not None:
        found.append(group)
    if out is not None:
        for kind in OUTPUT_SETS:
            status = files_status(Path(out), kind, now)
            if status is None:
                continue
            if (kind == "aggregate" and group is not None and status.state == group.state
                    and status.record == group.record):
                continue
            found.append(status)
    return found


def warning_line(statuses: list[OutputStatus]) -> str | None:
    """The first line ``inspect`` and ``report`` print when an output is not current."""
    problems = [s.message for s in statuses if s.state != "current"]
    return ("warning: " + "; ".join(problems)) if problems else None


def require_whole(statuses: list[OutputStatus]) -> None:
    """Refuse (``StoreError``) when any output is half-written."""
    for s in statuses:
        if s.state == "half-written":
            raise StoreError(s.message + "; refusing to report from it")


# -- writing aside ---------------------------------------------------------------------------------

#: an aside written on another host is taken for abandoned after this long without a change
ABANDONED_SECONDS = 24 * 3600


def _aside_tag() -> str:
    """The writer's host and pid, and a random part: ``<host>.<pid>.<hex>``."""
    return f"{socket.gethostname().replace('.', '_')}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _abandoned(aside: Path) -> bool:
    """Whether an aside folder was left by a writer that is gone: on this host, its pid no longer
    runs; written elsewhere (or unnamed, by an older version), nothing in it changed for
    ``ABANDONED_SECONDS``. Deleting a live writer's aside would let it switch in a group or a set of
    files missing what it wrote before."""
    host, _, rest = aside.name.partition(".tmp-")[2].partition(".")
    pid = rest.partition(".")[0]
    if host == socket.gethostname().replace(".", "_") and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False  # its writer still runs
    try:
        newest = max((p.stat().st_mtime for p in aside.rglob("*")), default=aside.stat().st_mtime)
    except OSError:
        return False
    return time.time() - newest > ABANDONED_SECONDS


class GroupAside:
    """Write a group of the store (``name``, e.g. ``aggregates``) so that no reader sees half of
    it: ``group`` is where to write; ``commit(attrs)`` writes the attributes (``attrs``, or
    ``self.attrs``, with ``complete`` and the list of ``arrays``) last and, on a local store, renames the group into place.
    ``abort()`` removes what a failed write left (local stores; on object storage the group is
    written in place, and without its completion marker readers refuse it)."""

    def __init__(self, store: str, name: str, storage_options: dict[str, Any] | None = None):
        self.store, self.name = str(store), name
        self.root = open_group(self.store, "r+", storage_options)
        self.local = not is_remote(self.store)
        if self.local:
            base = Path(local_path(self.store))
            for leftover in base.glob(f"{name}.tmp-*"):
                if _abandoned(leftover):  # from a write that was killed, never another's live one
                    shutil.rmtree(leftover, ignore_errors=True)
            self.aside = f"{name}.tmp-{_aside_tag()}"
            self.group = self.root.create_group(self.aside)
        else:
            self.aside = name
            self.group = self.root.create_group(name, overwrite=True)

    #: the attributes ``commit`` writes (with ``arrays`` and ``complete``), last
    attrs: dict[str, Any] = {}

    def commit(self, attrs: dict[str, Any] | None = None) -> None:
        arrays = sorted(name for name, _ in walk_arrays(self.group))
        self.group.attrs.update({**(self.attrs if attrs is None else attrs), "arrays": arrays, "complete": True})
        if not self.local:
            return
        base = Path(local_path(self.store))
        target, old = base / self.name, base / f"{self.name}.old-{uuid.uuid4().hex[:12]}"
        if target.exists():
            os.rename(target, old)
        os.rename(base / self.aside, target)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.local:
            shutil.rmtree(Path(local_path(self.store)) / self.aside, ignore_errors=True)


class FilesAside:
    """Write a set of files (``kind``: aggregate or evaluation) into the outputs folder ``out``
    atomically as seen by ``report``: ``path(name)`` is where to write a file; ``commit(manifest)``
    moves them into place between two manifest writes (``complete: false``, then ``true`` with
    the store state and the file names), and removes the files of the set's previous write that
    this one did not make. ``abort()`` removes the files written aside."""

    def __init__(self, out: Path, kind: str):
        self.out, self.kind = Path(out), kind
        self.manifest = self.out / OUTPUT_SETS[kind][0]
        self.out.mkdir(parents=True, exist_ok=True)
        for leftover in self.out.glob(f".{kind}.tmp-*"):
            if _abandoned(leftover):  # from a write that was killed, never another's live one
                shutil.rmtree(leftover, ignore_errors=True)
        self.aside = self.out / f".{kind}.tmp-{_aside_tag()}"
        self.aside.mkdir()

    def path(self, name: str) -> Path:
        return self.aside / name

    def final(self, name: str) -> Path:
        return self.out / name

    def commit(self, manifest: dict[str, Any]) -> Path:
        names = sorted(p.name for p in self.aside.iterdir())
        _write_json(self.manifest, {**manifest, "complete": False})
        for name in names:
            os.replace(self.aside / name, self.out / name)
        # the set is replaced as a whole: a file of the previous write that this one did not make
        # (a metric no longer in the store, plots switched off) would be shown as current
        patterns = OUTPUT_SETS[self.kind][1]
        for old in self.out.iterdir():
            if old.is_file() and _belongs(old.name, patterns) and old.name not in names:
                old.unlink()
        _write_json(self.manifest, {**manifest, "files_written": names, "complete": True})
        shutil.rmtree(self.aside, ignore_errors=True)
        return self.manifest

    def abort(self) -> None:
        shutil.rmtree(self.aside, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def write_parquet(table: Any, path: Path, record: dict[str, Any]) -> None:
    """A pandas DataFrame or pyarrow Table as Parquet, the store state in its schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_KEY] = json.dumps(record).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
