"""A user's mistake (wrong path, not a store, damaged store, unreadable data) ends in ONE
``error: ...`` line on stderr and exit code 2, never a traceback; ``--debug`` shows the exception."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from distributed_attr.cli import main
from distributed_attr.io.sources import SourceError
from distributed_attr.io.store import StoreError

from tests.conftest import base_config

STORE_COMMANDS = ["aggregate", "evaluate", "report", "inspect"]


def _argv(command: str, store, tmp_path) -> list[str]:
    argv = [command, str(store)]
    if command == "aggregate":
        argv += ["--workers", "0"]  # no Ray: the store must fail before any work starts
    if command in ("aggregate", "evaluate", "report"):
        argv += ["--out", str(tmp_path / "outputs")]
    return argv


def _assert_one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def _bad_stores(tmp_path) -> dict:
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    corrupt = tmp_path / "corrupt.zarr"
    corrupt.mkdir()
    (corrupt / "zarr.json").write_text("{not json")
    return {"missing": tmp_path / "missing.zarr", "empty": empty, "corrupt": corrupt}


@pytest.mark.parametrize("command", STORE_COMMANDS)
@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt"])
def test_store_commands_on_a_path_that_is_no_store_print_one_error_line(tmp_path, capsys, command, kind):
    store = _bad_stores(tmp_path)[kind]
    assert main(_argv(command, store, tmp_path)) == 2
    _assert_one_error_line(capsys, store.name)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command", STORE_COMMANDS)
def test_debug_reraises_the_store_error_with_its_traceback(tmp_path, capsys, command):
    with pytest.raises(StoreError):
        main(["--debug", *_argv(command, tmp_path / "missing.zarr", tmp_path)])


def test_a_file_where_a_store_should_be_is_a_user_error(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    assert main(["inspect", str(f)]) == 2
    _assert_one_error_line(capsys, "notes.txt")


# -- numpy sources --------------------------------------------------------------------------------


def _numpy_job(tmp_path, data_path, **data) -> str:
    cfg = base_config(data_path, tmp_path / "s.zarr")
    cfg["data"].update({"format": "numpy", **data})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg))
    return str(job)


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 32, 32), dtype=np.uint8)


def _bad_numpy_inputs(tmp_path) -> dict:
    obj = tmp_path / "objects.npy"
    np.save(obj, np.array([{"a": 1}, None, "x"], dtype=object), allow_pickle=True)
    folder = tmp_path / "images_dir"
    folder.mkdir()
    np.save(folder / "x.npy", _images())
    text = tmp_path / "images.npy"
    text.write_text("this is not an array\n")
    npz = tmp_path / "archive.npy"
    with open(npz, "wb") as fh:
        np.savez(fh, x=_images())
    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["a", "b"], ["c", "d"]]).reshape(1, 2, 2))
    return {"object dtype": (obj, "objects.npy"), "directory": (folder, "images_dir"),
            "not a .npy": (text, "images.npy"), "npz": (npz, "archive.npy"),
            "string dtype": (strings, "strings.npy")}


@pytest.mark.parametrize("kind", ["object dtype", "directory", "not a .npy", "npz", "string dtype"])
def test_a_numpy_source_that_cannot_be_read_is_one_error_line(tmp_path, capsys, kind):
    path, name = _bad_numpy_inputs(tmp_path)[kind]
    assert main(["run", _numpy_job(tmp_path, path), "--quiet"]) == 2
    err = _assert_one_error_line(capsys, name, "data.path")
    if kind == "object dtype":
        assert "object" in err


@pytest.mark.parametrize("labels, words", [
    (np.zeros((4, 2), dtype=np.int64), ["shape (4, 2)"]),
    (np.array(["a", "b", "c", "d"]), ["integer labels"]),
    (np.array([0.5, 1.0, 2.0, 3.0]), ["integer labels"]),
    (np.arange(3), ["3 labels for 4 images"]),
    (np.array([1, None, 2, 3], dtype=object), ["object"]),
    ("directory", ["directory"]),
])
def test_a_labels_file_of_the_wrong_kind_is_one_error_line(tmp_path, capsys, labels, words):
    images = tmp_path / "x.npy"
    np.save(images, _images())
    lab = tmp_path / "y.npy"
    if isinstance(labels, str):
        lab.mkdir()
    else:
        np.save(lab, labels, allow_pickle=labels.dtype.hasobject)
    assert main(["run", _numpy_job(tmp_path, images, labels_path=str(lab)), "--quiet"]) == 2
    _assert_one_error_line(capsys, "data.labels_path", "y.npy", *words)


def test_debug_reraises_the_source_error(tmp_path, capsys):
    path, _ = _bad_numpy_inputs(tmp_path)["object dtype"]
    with pytest.raises(SourceError, match="objects.npy"):
        main(["--debug", "run", _numpy_job(tmp_path, path), "--quiet"])


def test_a_missing_config_is_one_error_line_and_debug_shows_it(tmp_path, capsys):
    from distributed_attr.config import ConfigError

    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    _assert_one_error_line(capsys, "nope.yaml")
    with pytest.raises(ConfigError):
        main(["--debug", "run", str(tmp_path / "nope.yaml")])


def test_a_multi_line_error_message_is_folded_into_one_line(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("data: [unclosed\nstore: x\n")
    assert main(["run", str(job)]) == 2
    _assert_one_error_line(capsys, "job.yaml")


# -- inspect --verify -----------------------------------------------------------------------------


@pytest.mark.parametrize("invalid, code", [([], 0), ([3, 7], 1)])
def test_inspect_verify_passes_through_and_fails_on_invalid_units(monkeypatch, capsys, invalid, code):
    import json

    import distributed_attr.inspect as inspect_mod

    calls = []

    def fake_describe_store(path, verify=False):
        calls.append((path, verify))
        return {"store": path, "invalid_units": invalid}

    monkeypatch.setattr(inspect_mod, "describe_store", fake_describe_store)
    assert main(["inspect", "some.zarr", "--verify", "--json"]) == code
    assert calls == [("some.zarr", True)]
    out, err = capsys.readouterr()
    assert json.loads(out)["invalid_units"] == invalid  # printed before exiting
    assert ("3" in err) == bool(invalid)
