"""Parameters that name parts of the model (a CAM layer, the ReLUs guided backpropagation
rewrites, the layers a randomisation test re-initialises, the leading tokens of a ViT) are checked
on the driver's probe model, before the store exists: a mistake is one ``error:`` line naming the
config key and what the model offers, and the corrected rerun needs no ``--overwrite``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from distributed_attr.cli import main
from distributed_attr.methods import METHODS, Context, build_method, resolve_layer

from tests.conftest import saliency_only

pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORT = str(Path(__file__).resolve().parent / "support")


def _job(tmp_path, parquet_dir, methods=None, metrics=None, model=None) -> tuple[str, Path]:
    store = tmp_path / "s.zarr"
    cfg = saliency_only(parquet_dir, store)
    cfg["data"]["limit"] = 16
    if methods is not None:
        cfg["methods"] = methods
    if metrics is not None:
        cfg["metrics"] = metrics
    if model is not None:
        cfg["model"] = model
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cfg))
    return str(job), store


def _refused(capsys, job: str, store: Path, *words: str) -> str:
    assert main(["run", job, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not store.exists(), "the check must come before the store is created"
    return err


def test_a_cam_layer_that_is_not_in_the_model_is_refused_before_the_store_exists(tmp_path, parquet_dir, capsys):
    job, store = _job(tmp_path, parquet_dir, methods={"saliency": {}, "gradcam": {"layer": "features.99"}})
    err = _refused(capsys, job, store, "methods.gradcam.layer", "'features.99' is not a submodule")
    # what the model offers: the children of the deepest existing parent, and its conv layers
    assert "'features' has ['features.0'" in err and "convolutional layers:" in err and "'features.9'" in err, err
    # a near miss is named
    job, store = _job(tmp_path, parquet_dir, methods={"gradcam_pp": {"layer": "featurs.9"}})
    _refused(capsys, job, store, "methods.gradcam_pp.layer", "nearest names: ['features.9'")
    # the corrected rerun runs (no store was left behind to refuse it)
    job, store = _job(tmp_path, parquet_dir, methods={"gradcam": {"layer": "features.9"}})
    assert main(["run", job, "--quiet"]) == 0


def test_a_cam_layer_whose_output_is_no_feature_map_is_refused(tmp_path, parquet_dir, capsys):
    job, store = _job(tmp_path, parquet_dir, methods={"gradcam": {"layer": "classifier"}})
    _refused(capsys, job, store, "methods.gradcam.layer", "'classifier'", "shape (1, 10)")
    job, store = _job(tmp_path, parquet_dir, methods={"gradcam": {"layer": "features", "reshape": "tokens"}})
    _refused(capsys, job, store, "methods.gradcam.reshape", "reshape='tokens'")


def test_guided_backprop_on_a_model_without_relus_is_refused_naming_its_activations(tmp_path, parquet_dir, capsys,
                                                                                   monkeypatch):
    monkeypatch.syspath_prepend(SUPPORT)
    job, store = _job(tmp_path, parquet_dir, methods={"guided_backprop": {}},
                      model={"kind": "callable", "name": "probe_models:gelu_cnn"})
    _refused(capsys, job, store, "methods.guided_backprop:", "gelu x 1", "silu x 1", "activation modules: GELU x 1, SiLU x 1")


def test_layers_a_randomisation_test_cannot_reinitialise_are_refused(tmp_path, parquet_dir, capsys):
    job, store = _job(tmp_path, parquet_dir, metrics={"model_randomisation": {"layers": ["features.99"], "steps": 1}})
    _refused(capsys, job, store, "metrics.model_randomisation.layers", "'features.99'", "randomisable layers")


def _example():
    from distributed_attr.data import digits_uint8

    x, _ = digits_uint8(32, n=1)
    return torch.as_tensor(x[:1, None], dtype=torch.float32) / 255.0


def test_every_method_that_runs_on_a_cnn_passes_its_check_with_its_defaults(zoo_cnn):
    """No false refusal: each method's check accepts the digits CNN, the CAM layer chosen
    automatically as the job chooses it."""
    model = zoo_cnn[0].eval()
    x = _example()
    ctx = Context(budget=16, layer=resolve_layer(model, None, x), indices=torch.zeros(1, dtype=torch.int64))
    checked = []
    for name in METHODS.names():
        if METHODS.get(name).unsupported_reason(model) is None:
            build_method(name).check_model(model, x, ctx)
            checked.append(name)
    assert {"gradcam", "gradcam_pp", "guided_backprop", "lrp", "deeplift", "saliency"} <= set(checked)


def test_a_leading_token_count_that_leaves_no_patch_grid_is_refused():
    from distributed_attr.commons import ModelCheckError
    from tests.support.fault_models import random_digits_vit

    model = random_digits_vit().eval()
    x = _example()
    ctx = Context(budget=16)
    build_method("attention_rollout").check_model(model, x, ctx)  # the default infers the class token
    with pytest.raises(ModelCheckError, match="Set 'prefix_tokens'") as info:
        build_method("attention_rollout", {"prefix_tokens": 5}).check_model(model, x, ctx)
    assert info.value.param == "prefix_tokens"


def test_a_check_that_fails_otherwise_is_one_error_line_naming_the_method(tmp_path, parquet_dir, capsys, monkeypatch):
    """A check that runs the method (LRP, DeepLIFT) may fail with the method's own error rather than
    a ``ModelCheckError``: before, that was a traceback from the driver."""
    def failing(self, model, example, ctx):
        raise RuntimeError("the method's own error")

    monkeypatch.setattr(METHODS.get("lrp"), "check_model", failing)
    job, store = _job(tmp_path, parquet_dir, methods={"saliency": {}, "lrp": {}})
    _refused(capsys, job, store, "methods.lrp: the method cannot run on this model", "RuntimeError: the method's own error")
