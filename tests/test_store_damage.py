"""A damaged store, an output folder that cannot be written, a full disk: one ``error:`` line and
exit 2 from every command, never a traceback. ``--overwrite`` never follows a symlink and, if it
stops half-way, leaves a store marked not fully created. A store whose job stopped before its
first unit was finished is replaced by the corrected rerun without ``--overwrite``; one with a
finished unit never is.

The read-only and full-disk cases use a real tmpfs (``mount -t tmpfs``): they are skipped where
this process may not mount one (not root, no CAP_SYS_ADMIN)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml
import zarr

from distributed_attr.cli import main

from tests.conftest import saliency_only

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(data, store) -> dict:
    cfg = saliency_only(data, store)
    cfg["data"]["limit"] = 32  # two units of 16
    cfg["spectra"] = {"enabled": True}
    cfg["metrics"] = {"sparseness": {}}  # the cheapest metric, so that `evaluate` has something to read
    return cfg


@pytest.fixture(scope="module")
def made(tmp_path_factory, parquet_dir):
    """A complete small store, copied by each test (with a job file pointing at the copy)."""
    store = tmp_path_factory.mktemp("made") / "s.zarr"
    assert main(["run", _job(store.parent, parquet_dir, store), "--quiet"]) == 0
    return store


def _job(folder, data, store, **changes) -> str:
    cfg = _config(data, store)
    for section, values in changes.items():
        cfg[section] = values
    job = folder / f"job-{store.name}.yaml"
    job.write_text(yaml.safe_dump(cfg))
    return str(job)


def _copy(made, tmp_path, parquet_dir) -> tuple:
    store = tmp_path / "s.zarr"
    shutil.copytree(made, store, symlinks=True)
    return store, _job(tmp_path, parquet_dir, store)


def _one_error_line(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def _argv(command: str, store, job: str, out) -> list[str]:
    return {
        "inspect": ["inspect", str(store)],
        "inspect --verify": ["inspect", "--verify", str(store)],
        "aggregate": ["aggregate", str(store), "--workers", "0", "--out", str(out)],
        "evaluate": ["evaluate", str(store), "--out", str(out)],
        "report": ["report", str(store), "--out", str(out)],
        "run --resume": ["run", job, "--resume", "--quiet"],
        "run": ["run", job, "--quiet"],
    }[command]


COMMANDS = ["inspect", "inspect --verify", "aggregate", "evaluate", "report", "run --resume", "run"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", ["array metadata truncated", "units group deleted"])
def test_a_damaged_store_is_one_error_line_naming_the_damage(made, tmp_path, parquet_dir, capsys, command, damage):
    store, job = _copy(made, tmp_path, parquet_dir)
    if damage == "array metadata truncated":
        meta = store / "maps" / "saliency" / "zarr.json"
        meta.write_bytes(meta.read_bytes()[:40])
        words = ["is damaged", "'maps/saliency' cannot be read"]
    else:
        shutil.rmtree(store / "units")
        words = ["is damaged", "'units/done'", "missing"]
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    assert main(_argv(command, store, job, tmp_path / "out")) == 2
    _one_error_line(capsys, *words, "--overwrite")
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before  # nothing was changed


# -- folders that cannot take what is written ----------------------------------------------------

@contextlib.contextmanager
def _tmpfs(path, options: str):
    """A real tmpfs mounted at ``path`` (skips the test where mounting is not allowed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder, leave: int = 0) -> None:
    """Fill the file system of ``folder`` up (until a write says ENOSPC), then free ``leave`` bytes."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as info:
            while True:
                os.write(fd, b"\0" * 4096)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    if leave:
        os.truncate(folder / "filler", max(0, (folder / "filler").stat().st_size - leave))


@pytest.mark.parametrize("command", ["aggregate", "evaluate", "report"])
@pytest.mark.parametrize("where", ["under a regular file", "read-only file system", "full disk"])
def test_an_output_folder_that_cannot_be_written_is_one_error_line(made, tmp_path, parquet_dir, capsys, command,
                                                                  where):
    store, job = _copy(made, tmp_path, parquet_dir)
    with contextlib.ExitStack() as stack:
        if where == "under a regular file":
            (tmp_path / "a-file").write_text("x")
            out, words = tmp_path / "a-file" / "out", ["Not a directory", "a-file"]
        elif where == "read-only file system":
            out = stack.enter_context(_tmpfs(tmp_path / "ro", "ro,size=64k")) / "out"
            words = ["Read-only file system", "choose a writable folder"]
        else:
            mount = stack.enter_context(_tmpfs(tmp_path / "full", "size=64k"))
            _fill(mount)
            out, words = mount / "out", ["No space left on device", "free some space"]
        assert main(_argv(command, store, job, out)) == 2
        _one_error_line(capsys, *words)


def test_a_full_disk_under_the_store_is_one_error_line_and_the_rerun_replaces_what_was_begun(tmp_path, parquet_dir,
                                                                                              capsys):
    with _tmpfs(tmp_path / "disk", "size=2m") as disk:
        store = disk / "s.zarr"
        job = _job(tmp_path, parquet_dir, store)
        _fill(disk, leave=3 * os.sysconf("SC_PAGE_SIZE"))  # the lease fits, the store does not
        assert main(["run", job, "--quiet"]) == 2
        _one_error_line(capsys, "No space left on device")
        assert store.exists() and not zarr.open_group(str(store), mode="r").attrs.get("ready")
        (disk / "filler").unlink()  # space freed: the same command again, no --overwrite
        assert main(["run", job, "--quiet"]) == 0
        err = capsys.readouterr().err
        assert "replacing the store" in err and "not fully created" in err and "kept" not in err, err
        assert zarr.open_group(str(store), mode="r")["units/done"][:].all()


# -- --overwrite and symlinks ---------------------------------------------------------------------

def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_removes_links_inside_the_store_never_what_they_point_to(made, tmp_path, parquet_dir, capsys):
    store, job = _copy(made, tmp_path, parquet_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # a whole node moved out and linked back (top level), and one inside a group
    shutil.move(str(store / "hf_fraction"), str(elsewhere / "hf_fraction"))
    (store / "hf_fraction").symlink_to(elsewhere / "hf_fraction", target_is_directory=True)
    shutil.move(str(store / "maps" / "saliency"), str(elsewhere / "saliency"))
    (store / "maps" / "saliency").symlink_to(elsewhere / "saliency", target_is_directory=True)
    (elsewhere / "saliency" / "my-notes.txt").write_text("not the store's")
    before = _files(elsewhere)
    assert main(["run", job, "--quiet", "--overwrite"]) == 0
    assert _files(elsewhere) == before  # the links' targets are untouched
    for node in (store / "hf_fraction", store / "maps" / "saliency"):
        assert node.is_dir() and not node.is_symlink()  # the links went; the job wrote real nodes
    g = zarr.open_group(str(store), mode="r")
    assert g.attrs["ready"] and g["units/done"][:].all()
    np.testing.assert_array_equal(g["maps/saliency"][:], zarr.open_group(str(made), mode="r")["maps/saliency"][:])


def test_overwrite_that_stops_half_way_leaves_the_store_marked_incomplete_and_the_rerun_replaces_it(
        made, tmp_path, parquet_dir, capsys):
    store, job = _copy(made, tmp_path, parquet_dir)
    # a mount point inside the store: its folder cannot be removed (EBUSY), a real half-way stop
    with _tmpfs(store / "image" / "c", "size=64k"):
        assert main(["run", job, "--quiet", "--overwrite"]) == 2
        _one_error_line(capsys, "deleting the store", "'image'", "marked not fully created")
        assert not (store / "hf_fraction").exists()  # deleted before the stop
        assert not zarr.open_group(str(store), mode="r").attrs.get("ready")
        for command in ("inspect", "aggregate", "report"):  # no reader takes it for a complete store
            assert main(_argv(command, store, job, tmp_path / "out")) == 2
            _one_error_line(capsys, "not fully created")
    assert main(["run", job, "--quiet"]) == 0  # no --overwrite needed
    assert "replacing the store" in capsys.readouterr().err
    assert zarr.open_group(str(store), mode="r")["units/done"][:].all()


# -- a store whose job stopped before its first unit ----------------------------------------------

def _fail_units_from(monkeypatch, first_bad_image: int) -> None:
    from distributed_attr.pipeline import UnitProcessor

    compute = UnitProcessor.compute_batch

    def failing(self, x, labels, indices, masks=None):
        if int(indices.max()) >= first_bad_image:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return compute(self, x, labels, indices, masks)

    monkeypatch.setattr(UnitProcessor, "compute_batch", failing)


def test_a_store_whose_job_failed_before_its_first_unit_is_replaced_by_the_corrected_rerun(tmp_path, parquet_dir,
                                                                                          capsys, monkeypatch):
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        _fail_units_from(m, 0)
        assert main(["run", _job(tmp_path, parquet_dir, store), "--quiet"]) == 2
    capsys.readouterr()
    assert store.exists() and not zarr.open_group(str(store), mode="r")["units/done"][:].any()
    corrected = _job(tmp_path, parquet_dir, store, methods={"gradient_x_input": {}})
    assert main(["run", corrected, "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "replacing the store" in line]
    assert len(lines) == 1 and "stopped before the first unit" in lines[0] and "different config" in lines[0], err
    g = zarr.open_group(str(store), mode="r")
    assert g.attrs["methods"] == ["gradient_x_input"] and g["units/done"][:].all()


def test_a_store_with_one_finished_unit_is_never_replaced_without_overwrite(tmp_path, parquet_dir, capsys,
                                                                           monkeypatch):
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        _fail_units_from(m, 16)  # unit 0 finishes, unit 1 fails
        assert main(["run", _job(tmp_path, parquet_dir, store), "--quiet"]) == 2
    capsys.readouterr()
    done = zarr.open_group(str(store), mode="r")["units/done"][:]
    assert done.tolist() == [1, 0]
    before = _files(store)
    for flags in ([], ["--resume"]):
        assert main(["run", _job(tmp_path, parquet_dir, store, methods={"gradient_x_input": {}}), "--quiet",
                     *flags]) == 2
        _one_error_line(capsys, "different config", "--overwrite")
    after = _files(store)
    assert {k: v for k, v in after.items() if not k.startswith("lease")} == {
        k: v for k, v in before.items() if not k.startswith("lease")}
