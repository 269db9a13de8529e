"""Derived results know the store state they were computed from (issue 20, item 4).

A store has a generation counter (root attribute ``generation``) that every commit and every
``--verify`` invalidation advances. ``aggregate``/``evaluate`` refuse a store that is not complete
unless ``--partial``, which every output then records and shows; ``inspect`` and ``report`` say
on their first line when aggregates or evaluations are out of date or partial; outputs are written
aside and switched, and ``report`` refuses a half-written ``aggregates`` group.

Small synthetic stores (``write_synthetic_store``), the aggregation in this process (no Ray) and
the store API for commits: no attribution job is run here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from distributed_attr.aggregate import run_aggregation
from distributed_attr.aggregate.synthetic import write_synthetic_store
from distributed_attr.cli import main
from distributed_attr.io.store import AttributionStore

from tests.test_evaluation import peaked, write_store

SMALL = dict(n_images=24, unit_size=8, height=12, methods=("saliency",), n_classes=2, sweep=(100, 15))


def _store(tmp_path, name="s.zarr", **kw) -> str:
    return write_synthetic_store(tmp_path / name, **{**SMALL, **kw})


def _one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def _first_line(capsys) -> str:
    return capsys.readouterr().out.splitlines()[0]


def _aggregated_then_one_more_unit(tmp_path) -> tuple[str, Path]:
    """A store of 3 units aggregated (``--partial``) over 2, then the job goes on: one more unit
    committed through the store API, as the driver does. (store, outputs folder)."""
    store = _store(tmp_path, done_units=[0, 1])
    out = tmp_path / "out"
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False, partial=True)
    h = AttributionStore.open(store, "r+")
    h.commit_unit(2, 1.0, {})
    h.flush()
    return store, out


def _banner(html: str) -> str:
    """The first element of the report's body, when it is the warning banner ("" otherwise)."""
    body = html.split("<body>", 1)[1].lstrip()
    if not body.startswith("<div class='banner'"):
        return ""
    return body.split("</div>", 1)[0]


def _parquet_record(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"distributed_attr"])


def test_generation_advances_with_every_commit_and_invalidation(tmp_path):
    store = _store(tmp_path, done_units=[])
    h = AttributionStore.open(store, "r+")
    assert h.generation == 0 and zarr.open_group(store, mode="r").attrs["generation"] == 0
    h.flush()  # nothing to commit: nothing changed
    assert AttributionStore.open(store, "r").generation == 0
    h.commit_unit(0, 1.0, {})
    h.commit_unit(1, 1.0, {})
    h.flush()  # one batch of commits: one step
    assert AttributionStore.open(store, "r").generation == 1
    h.mark_not_done({})
    assert AttributionStore.open(store, "r").generation == 1
    h.mark_not_done({1: "maps/saliency: shard c/1/0/0 is missing"})
    assert AttributionStore.open(store, "r").generation == 2
    first_id = AttributionStore.open(store, "r").attrs["store_id"]
    # recreated at the same path: a new store (another id), whatever its generation
    store = _store(tmp_path)
    again = AttributionStore.open(store, "r")
    assert again.generation == 1 and again.attrs["store_id"] != first_id


def test_aggregate_refuses_an_incomplete_store_and_partial_is_marked_everywhere(tmp_path, capsys):
    store = _store(tmp_path, done_units=[0, 1])
    out = tmp_path / "out"
    argv = ["aggregate", store, "--workers", "0", "--out", str(out)]
    assert main(argv) == 2
    _one_error_line(capsys, "2 of 3 units", "--resume", "--partial")
    assert "aggregates" not in zarr.open_group(store, mode="r")
    assert not (out / "summary.parquet").exists()

    assert main([*argv, "--partial"]) == 0
    first = _first_line(capsys)
    assert first.startswith("partial:") and "2 of 3 units" in first, first
    generation = zarr.open_group(store, mode="r").attrs["generation"]
    attrs = dict(zarr.open_group(store, mode="r")["aggregates"].attrs)
    assert attrs["partial"] is True and attrs["units_done"] == 2 and attrs["n_units"] == 3
    assert attrs["store_generation"] == generation and attrs["complete"] is True
    for table in ("summary.parquet", "spectra.parquet"):
        record = _parquet_record(out / table)
        assert record["partial"] is True and record["units_done"] == 2 and record["store_generation"] == generation
    assert json.loads((out / "aggregate.json").read_text())["partial"] is True

    assert main(["inspect", store]) == 0
    first = _first_line(capsys)
    assert first.startswith("warning:") and "partial" in first and "out of date" not in first, first
    assert main(["report", store, "--out", str(out)]) == 0
    first = _first_line(capsys)
    assert first.startswith("warning:") and "partial" in first, first
    banner = _banner((out / "report.html").read_text())
    assert "partial" in banner and "2 of 3 units" in banner, banner


def test_evaluate_refuses_an_incomplete_store_and_records_partial(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 40
    metrics = {"insertion": {"auc": {"a": peaked(n, 1, 0.2, rng), "b": peaked(n, 0, 0.2, rng)}}}
    # a schema 1.0 store, without a generation attribute: read as generation 0
    store = write_store(tmp_path / "e.zarr", metrics, n=n, done=[1, 1, 0, 1])
    assert main(["evaluate", str(store), "--out", str(tmp_path / "eval")]) == 2
    _one_error_line(capsys, "3 of 4 units", "--resume", "--partial")
    assert not (tmp_path / "eval" / "evaluation.json").exists()

    from distributed_attr.evaluation import run_evaluation

    summary = run_evaluation(store, tmp_path / "eval", n_boot=20, plots=False, partial=True)
    assert summary["partial"] is True and summary["units_done"] == 3 and summary["store_generation"] == 0
    manifest = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert manifest["partial"] is True and manifest["complete"] is True and manifest["n_units"] == 4
    assert _parquet_record(tmp_path / "eval" / "rankings.parquet")["partial"] is True


def test_outputs_made_before_more_units_were_committed_are_out_of_date(tmp_path, capsys):
    store, out = _aggregated_then_one_more_unit(tmp_path)

    assert main(["inspect", store]) == 0
    first = _first_line(capsys)
    assert first.startswith("warning:") and "out of date" in first and "distributed-attr aggregate" in first, first
    assert main(["report", store, "--out", str(out)]) == 0
    first = _first_line(capsys)
    assert first.startswith("warning:") and "out of date" in first, first
    html = (out / "report.html").read_text()
    banner = _banner(html)
    assert "out of date" in banner and "2 of 3 units" in banner and "3 of 3 units" in banner, banner

    # aggregated again on the complete store: current, nothing said
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    assert main(["inspect", store]) == 0
    assert _first_line(capsys).startswith("store ")
    assert main(["report", store, "--out", str(out)]) == 0
    assert _first_line(capsys).startswith("report: ")
    assert _banner((out / "report.html").read_text()) == ""

    # `inspect --verify` found a damaged unit and marked it not done: out of date again
    AttributionStore.open(store, "r+").mark_not_done({1: "maps/saliency: shard c/1/0/0 is missing"})
    assert main(["inspect", store]) == 0
    first = _first_line(capsys)
    assert first.startswith("warning:") and "out of date" in first, first


def test_aggregate_refuses_a_store_a_job_is_writing(tmp_path, capsys):
    from distributed_attr.io.lease import StoreLease

    store = _store(tmp_path)
    with StoreLease.acquire(store):  # a driver holds the store (this process, alive)
        assert main(["aggregate", store, "--workers", "0", "--out", str(tmp_path / "out")]) == 2
        _one_error_line(capsys, "running job", "3 of 3 units", "--partial")
    assert main(["aggregate", store, "--workers", "0", "--out", str(tmp_path / "out")]) == 0


def test_report_refuses_a_half_written_aggregates_group(tmp_path, capsys):
    store = _store(tmp_path)
    out = tmp_path / "out"
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    group = zarr.open_group(store, mode="r+")["aggregates"]
    complete = dict(group.attrs)

    # the completion marker is missing (written last: the writer stopped before it)
    group.attrs.put({k: v for k, v in complete.items() if k != "complete"})
    assert main(["report", store, "--out", str(out)]) == 2
    _one_error_line(capsys, "aggregates", "half-written", f"distributed-attr aggregate {store}")
    assert main(["inspect", store]) == 0  # inspect says it, on its first line
    assert "half-written" in _first_line(capsys)

    # the marker is there, an array is not
    group.attrs.put(complete)
    shutil.rmtree(Path(store) / "aggregates" / "saliency" / "spectrum_mean")
    assert main(["report", store, "--out", str(out)]) == 2
    _one_error_line(capsys, "aggregates", "saliency/spectrum_mean", f"distributed-attr aggregate {store}")

    # a node's metadata unreadable inside the group (a truncated zarr.json): before, inspect and
    # report ended in a JSONDecodeError traceback
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    meta = Path(store) / "aggregates" / "saliency" / "spectrum_mean" / "zarr.json"
    meta.write_text(meta.read_text()[:20])
    assert main(["report", store, "--out", str(out)]) == 2
    _one_error_line(capsys, "aggregates", "half-written", "cannot be read", f"distributed-attr aggregate {store}")
    assert main(["inspect", store]) == 0
    assert "half-written" in _first_line(capsys)

    # rerun: whole again
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    assert main(["report", store, "--out", str(out)]) == 0
    assert _first_line(capsys).startswith("report: ")

    # half-written tables in the outputs folder (their record says a switch was under way)
    manifest = json.loads((out / "aggregate.json").read_text())
    (out / "aggregate.json").write_text(json.dumps({**manifest, "complete": False}))
    assert main(["report", store, "--out", str(out)]) == 2
    _one_error_line(capsys, "half-written", str(out), "distributed-attr aggregate")


def test_a_write_that_fails_leaves_the_previous_outputs_whole(tmp_path, capsys, monkeypatch):
    """A disk that fills while the aggregation writes: the group and the tables of the run before
    stay as they were (out of date, not half-written), and nothing of the failed write is left."""
    from distributed_attr.aggregate import job

    store, out = _aggregated_then_one_more_unit(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "write_tables", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    attrs = dict(zarr.open_group(store, mode="r")["aggregates"].attrs)
    assert attrs["complete"] is True and attrs["units_done"] == 2
    assert sorted(p.name for p in Path(store).iterdir() if p.name.startswith("aggregates")) == ["aggregates"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert main(["report", store, "--out", str(out)]) == 0
    assert "out of date" in _first_line(capsys)


def test_aggregates_of_an_older_version_are_read_and_said_to_be_of_unknown_state(tmp_path, capsys):
    """An ``aggregates`` group written by a version before the generation counter (attributes
    ending with ``units_aggregated``, written last, and no ``complete``) is whole, of unknown state."""
    store = _store(tmp_path)
    out = tmp_path / "out"
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    group = zarr.open_group(store, mode="r+")["aggregates"]
    old = ("created", "units_aggregated", "hf_cutoff", "methods", "spectra_source")
    group.attrs.put({k: v for k, v in dict(group.attrs).items() if k in old})
    assert main(["inspect", store]) == 0
    first = _first_line(capsys)
    assert first.startswith("warning:") and "older version" in first, first


def test_a_new_aggregate_replaces_the_previous_files_as_a_whole(tmp_path):
    """A figure of an earlier aggregate that this one does not draw (plots switched off) would be
    shown beside the new tables as if it were current: the set is replaced as a whole."""
    store = _store(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "spectra.png").write_bytes(b"an earlier aggregate's figure")
    (out / "notes.txt").write_text("not ours: kept")
    run_aggregation(store, num_workers=0, out_dir=str(out), plots=False)
    assert not (out / "spectra.png").exists() and (out / "notes.txt").read_text() == "not ours: kept"
    assert json.loads((out / "aggregate.json").read_text())["files_written"] == ["spectra.parquet", "summary.parquet"]


def test_a_unit_committed_while_a_partial_aggregate_reads_counts_neither_way(tmp_path, capsys, monkeypatch):
    """The job commits unit 2 while ``aggregate --partial`` is reading (here: right after the
    aggregation read the done flags): the aggregate covers the units it read as done, records
    them, and shows as out of date afterwards, instead of refusing as "the store changed"."""
    store = _store(tmp_path, done_units=[0, 1])
    checked = AttributionStore.verify

    def verify_while_the_driver_commits(self, **kw):
        found = checked(self, **kw)
        driver = AttributionStore.open(store, "r+")
        driver.commit_unit(2, 1.0, {})
        driver.flush()
        return found

    monkeypatch.setattr(AttributionStore, "verify", verify_while_the_driver_commits)
    result = run_aggregation(store, num_workers=0, out_dir=str(tmp_path / "out"), plots=False, partial=True)
    monkeypatch.undo()
    assert result["images"] == 16 and result["units_done"] == 2 and result["partial"] is True
    assert main(["inspect", store]) == 0
    assert "out of date" in _first_line(capsys)


def test_a_second_writer_never_deletes_a_running_writers_aside(tmp_path):
    """Before, every new write deleted every ``aggregates.tmp-*`` as a leftover, also that of a
    write still running, which then switched in a group missing what it had written before."""
    import subprocess
    import sys

    from distributed_attr.io.derived import FilesAside, GroupAside

    store = _store(tmp_path)
    first = GroupAside(store, "aggregates")
    first.group.create_array("x", data=np.arange(3))
    files = FilesAside(tmp_path / "out", "aggregate")
    files.path("spectra.parquet").write_text("x")
    # a writer killed mid-write on this host: its pid no longer runs
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = first.aside.split(".tmp-")[1].split(".")[0]
    killed = Path(store) / f"aggregates.tmp-{host}.{pid}.0123456789ab"
    killed.mkdir()
    killed_files = tmp_path / "out" / f".aggregate.tmp-{host}.{pid}.0123456789ab"
    killed_files.mkdir()

    GroupAside(store, "aggregates").abort()
    FilesAside(tmp_path / "out", "aggregate").abort()
    assert not killed.exists() and not killed_files.exists()
    first.commit({"what": "first"})
    assert sorted(name for name, _ in zarr.open_group(store, mode="r")["aggregates"].arrays()) == ["x"]
    files.commit({"what": "first"})
    assert (tmp_path / "out" / "spectra.parquet").read_text() == "x"


def test_evaluate_partial_reads_one_set_of_units_while_a_job_commits(tmp_path, monkeypatch):
    """Before, every metric table re-read ``units/done``: a unit committed between two of them gave
    tables of different images (rank_methods failed on their lengths, or the summary counted images
    the record does not)."""
    from distributed_attr.evaluation import run as evaluation_run
    from distributed_attr.evaluation.run import run_evaluation

    rng = np.random.default_rng(0)
    n = 40
    metrics = {m: {"auc": {"a": peaked(n, 1, 0.2, rng), "b": peaked(n, 0, 0.2, rng)}} for m in ("insertion", "deletion")}
    store = write_store(tmp_path / "e.zarr", metrics, n=n, done=[1, 1, 0, 1])
    real = evaluation_run.cutoff_statistics
    calls = []

    def committing(group, metric, *args, **kw):  # the job commits unit 2 after the first table
        if calls:
            zarr.open_group(str(store), mode="r+")["units/done"][2] = 1
        calls.append(metric)
        return real(group, metric, *args, **kw)

    monkeypatch.setattr(evaluation_run, "cutoff_statistics", committing)
    summary = run_evaluation(store, tmp_path / "eval", n_boot=20, plots=False, partial=True)
    assert len(calls) == 2 and summary["units_done"] == 3 and summary["n_images"] == 30
    ranks = pq.read_table(tmp_path / "eval" / "rankings.parquet").to_pandas()
    assert len(ranks)  # ranked over the same 30 images for both metrics
