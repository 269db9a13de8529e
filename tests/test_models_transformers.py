"""Transformer models: Hugging Face image classifiers from a directory (kind 'huggingface') and
timm ViT/DeiT/Swin (kind 'timm'), built tiny here and saved locally; nothing is downloaded.

The oracle is always the library's own model: the loaded model's logits must equal those of the
model that was saved."""
from __future__ import annotations

import json
import logging
import socket
import sys

import numpy as np
import pytest
import torch

from distributed_attr.config import Config, ConfigError, DataConfig, ModelConfig
from distributed_attr.io.models import (
    LogitsOf,
    ModelError,
    check_preprocessing,
    fingerprint,
    load_model,
)
from distributed_attr.methods import attribute, resolve_layer

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 10


def _x(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------


def _tiny_vit_config(**over):
    from transformers import ViTConfig

    kw = dict(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
              intermediate_size=64, num_labels=N_CLASSES)
    kw.update(over)
    return ViTConfig(**kw)


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """A tiny ViT classifier saved with save_pretrained, and its image processor config
    (mean/std 0.5, 32 px)."""
    pytest.importorskip("transformers")
    from transformers import ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(_tiny_vit_config()).eval()
    d = tmp_path_factory.mktemp("hf") / "tiny-vit"
    model.save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(d)
    return model, d


def test_huggingface_logits_equal_the_library_model(hf_vit):
    original, d = hf_vit
    loaded = load_model(ModelConfig(kind="huggingface", weights=str(d), num_classes=N_CLASSES))
    assert isinstance(loaded, LogitsOf) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _x()
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == (2, N_CLASSES)
    torch.testing.assert_close(out, _hf_logits(original, x), rtol=0, atol=0)
    # the fingerprint covers the wrapped model's weights, and is the same on every load
    assert fingerprint(loaded) == fingerprint(load_model(ModelConfig(kind="huggingface", weights=f"file://{d}")))
    # the processor's expectations are kept for the data check
    assert loaded.preprocessing["mean"] == [0.5] * 3 and loaded.preprocessing["image_size"] == 32


def test_huggingface_layers_are_named_through_the_wrapper(hf_vit):
    original, d = hf_vit
    loaded = load_model(ModelConfig(kind="huggingface", weights=str(d)))
    # names as the installed transformers spells them (5.x: vit.layers.N; 4.x: vit.encoder.layer.N)
    name = [n for n, _ in original.named_modules() if n.endswith("layernorm_before")][-1]
    inner = loaded.model.get_submodule(name)
    assert resolve_layer(loaded, f"model.{name}") is inner  # the wrapper's own path
    assert resolve_layer(loaded, name) is inner  # the Hugging Face model's path, as it prints it
    assert dict(loaded.named_modules())[f"model.{name}"] is inner
    with pytest.raises(ValueError, match="is not a submodule of the model"):
        resolve_layer(loaded, "model.vit.nowhere")


def test_saliency_and_gradcam_run_on_a_huggingface_model(hf_vit):
    _, d = hf_vit
    model = load_model(ModelConfig(kind="huggingface", weights=str(d)))
    x = _x(3)
    # gradcam with the layer found automatically: the last 4-D output, here the patch embedding's
    # convolution. It runs; a meaningful CAM layer of a ViT is a block (test below)
    for method in ("saliency", "gradcam"):
        maps = attribute(model, x, method)
        assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0, method


def test_gradcam_on_a_transformer_block(hf_vit):
    original, d = hf_vit
    model = load_model(ModelConfig(kind="huggingface", weights=str(d)))
    name = [n for n, _ in original.named_modules() if n.endswith("layernorm_before")][-1]
    maps = attribute(model, _x(), "gradcam", layer=f"model.{name}")
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0


def _save(model, d, config_edit=None):
    model.save_pretrained(d)
    if config_edit:
        cfg = json.loads((d / "config.json").read_text())
        config_edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_huggingface_errors_say_what_is_wrong(hf_vit, tmp_path):
    from transformers import BertConfig, BertModel, ViTModel

    _, d = hf_vit

    def load(weights, **kw):
        return load_model(ModelConfig(kind="huggingface", weights=str(weights), **kw))

    with pytest.raises(ModelError, match=r"model.weights: directory .*missing.* does not exist.*nothing is downloaded"):
        load(tmp_path / "missing")
    with pytest.raises(ModelError, match=r"'google/vit-base-patch16-224' looks like a Hugging Face Hub id.*"
                                         r"hf download google/vit-base-patch16-224 --local-dir DIR"):
        load("google/vit-base-patch16-224")
    with pytest.raises(ModelError, match=r"is a file; kind 'huggingface' needs the directory"):
        load(d / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config.json in .*empty"):
        load(tmp_path / "empty")
    with pytest.raises(ModelError, match=r"model.weights: required|needs 'weights'"):
        load_model(ModelConfig(kind="huggingface", name="google/vit-base-patch16-224"))

    # not an image classifier: a text model, a ViT without its head, a head whose weights are missing
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ModelError, match=r"holds a BertModel, not an image-classification model"):
        load(_save(bert, tmp_path / "bert"))
    with pytest.raises(ModelError, match=r"'bert' has no AutoModelForImageClassification class"):
        load(_save(bert, tmp_path / "bert-no-arch", lambda c: c.pop("architectures")))
    headless = ViTModel(_tiny_vit_config())
    with pytest.raises(ModelError, match=r"holds a ViTModel, not an image-classification model"):
        load(_save(headless, tmp_path / "vit-base"))
    relabelled = _save(headless, tmp_path / "vit-relabelled",
                       lambda c: c.update(architectures=["ViTForImageClassification"]))
    with pytest.raises(ModelError, match=r"lacks weights for \['classifier.bias', 'classifier.weight'\]; they would be random"):
        load(relabelled)

    with pytest.raises(ModelError, match=r"model.num_classes: 7, but the model in .* has 10 classes"):
        load(d, num_classes=7)
    with pytest.raises(ModelError, match=r"kwargs.trust_remote_code is refused .*run Python files"):
        load(d, kwargs={"trust_remote_code": True})
    with pytest.raises(ModelError, match=r"kwargs.revision is not accepted .*accepted: attn_implementation"):
        load(d, kwargs={"revision": "main"})
    custom = _save(ViTModel(_tiny_vit_config()), tmp_path / "custom",
                   lambda c: c.update(architectures=["MyViTForImageClassification"],
                                      auto_map={"AutoModelForImageClassification": "modeling_my.MyViT"}))
    with pytest.raises(ModelError, match=r"needs its own Python code .*trust_remote_code\) is refused"):
        load(custom)


def test_the_config_refuses_remote_code_and_a_missing_directory(tmp_path):
    base = {"data": {"path": str(tmp_path)}, "store": str(tmp_path / "s.zarr")}
    with pytest.raises(ConfigError, match=r"model: kwargs.trust_remote_code is refused for kind 'huggingface'"):
        Config.from_dict({**base, "model": {"kind": "huggingface", "weights": str(tmp_path),
                                            "kwargs": {"trust_remote_code": True}}})
    with pytest.raises(ConfigError, match=r"model: kind 'huggingface' needs 'weights'.*nothing is downloaded"):
        Config.from_dict({**base, "model": {"kind": "huggingface", "name": "google/vit-base-patch16-224"}})


def test_a_missing_library_names_the_extra(hf_vit, monkeypatch):
    _, d = hf_vit
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ModelError, match=r"needs transformers: pip install 'distributed-attr\[huggingface\]'"):
        load_model(ModelConfig(kind="huggingface", weights=str(d)))
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelError, match=r"needs timm: pip install 'distributed-attr\[timm\]'"):
        load_model(ModelConfig(kind="timm", name="vit_tiny_patch16_224"))


def test_preprocessing_differences_are_logged_not_changed(hf_vit, caplog):
    _, d = hf_vit
    model = load_model(ModelConfig(kind="huggingface", weights=str(d)))
    imagenet = DataConfig(path="x", image_size=32)  # ImageNet mean/std by default
    with caplog.at_level(logging.WARNING, logger="distributed_attr.io.models"):
        load_model(ModelConfig(kind="huggingface", weights=str(d)), data=imagenet)  # checks when given the data
    assert [r.getMessage().split(" differs")[0] for r in caplog.records] == [
        "model: data.mean [0.485, 0.456, 0.406]", "model: data.std [0.229, 0.224, 0.225]"]
    notes = check_preprocessing(model, imagenet)
    assert len(notes) == 2 and all("preprocessor_config.json in" in n for n in notes)
    assert "data.mean [0.485, 0.456, 0.406] differs from the mean the model expects, [0.5, 0.5, 0.5]" in notes[0]
    assert imagenet.mean == [0.485, 0.456, 0.406]  # the data config is not changed
    assert check_preprocessing(model, DataConfig(path="x", image_size=32, mean=[0.5], std=[0.5, 0.5, 0.5])) == []
    assert "input size 32" in check_preprocessing(model, DataConfig(path="x", image_size=64, mean=[0.5], std=[0.5]))[0]


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------

TIMM = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
    "swin_tiny_patch4_window7_224": dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                         num_heads=(1, 2)),
}


def _timm_model(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=N_CLASSES, **TIMM[name]).eval()


@pytest.mark.parametrize("name,fmt", [("vit_tiny_patch16_224", "pth"), ("deit_tiny_distilled_patch16_224", "pth"),
                                      ("swin_tiny_patch4_window7_224", "safetensors"),
                                      ("vit_tiny_patch16_224", "safetensors-no-extension")])
def test_timm_transformers_from_a_local_weights_file(name, fmt, tmp_path):
    original = _timm_model(name)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.bin" if fmt.startswith("safetensors") else "w.pth")
    if fmt.startswith("safetensors"):
        from safetensors.torch import save_file

        save_file(original.state_dict(), str(path))
    else:
        torch.save({"model": original.state_dict(), "epoch": 3}, path)  # a DeiT-style training checkpoint
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in TIMM[name].items()}  # as YAML gives them
    loaded = load_model(ModelConfig(kind="timm", name=name, num_classes=N_CLASSES, weights=str(path), kwargs=kwargs))
    x = _x()
    with torch.no_grad():
        out = loaded(x)
        torch.testing.assert_close(out, original(x), rtol=0, atol=0)
    assert out.shape == (2, N_CLASSES) and fingerprint(loaded) == fingerprint(original)
    # gradcam: only that it runs. The automatic layer is no choice for these models (ViT/DeiT: an
    # attention's k_norm, (N, heads, tokens, d); Swin: the final norm, channels last): name a block
    for method in ("saliency", "gradcam"):
        maps = attribute(loaded, x, method)
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all(), method


def test_gradcam_on_a_timm_block():
    vit = _timm_model("vit_tiny_patch16_224")
    maps = attribute(vit, _x(), "gradcam", layer="blocks.1.norm1")
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_timm_errors_say_what_is_wrong(tmp_path):
    original = _timm_model("vit_tiny_patch16_224")
    torch.save(original.state_dict(), tmp_path / "w.pth")
    kw = TIMM["vit_tiny_patch16_224"]
    with pytest.raises(ModelError, match=r"model.name: 'vit_nonsense' is not a timm model; similar: \['vit_"):
        load_model(ModelConfig(kind="timm", name="vit_nonsense"))
    with pytest.raises(ModelError, match=r"model: timm cannot build 'vit_tiny_patch16_224' .*bogus"):
        load_model(ModelConfig(kind="timm", name="vit_tiny_patch16_224", kwargs={"bogus": 1}))
    with pytest.raises(ModelError, match=r"kwargs.pretrained is refused for kind 'timm'"):
        load_model(ModelConfig(kind="timm", name="vit_tiny_patch16_224", kwargs={"pretrained": True}))
    with pytest.raises(ModelError, match=r"(?s)does not fit the architecture.*size mismatch for head.weight"):  # num_classes passed: 7-class head
        load_model(ModelConfig(kind="timm", name="vit_tiny_patch16_224", num_classes=7, weights=str(tmp_path / "w.pth"),
                               kwargs=kw))
    with pytest.raises(ModelError, match=r"model.weights: file .* does not exist"):
        load_model(ModelConfig(kind="timm", name="vit_tiny_patch16_224", weights=str(tmp_path / "none.pth"), kwargs=kw))


def test_timm_pretrained_cfg_normalisation_is_checked(caplog):
    vit = _timm_model("vit_tiny_patch16_224")  # timm's published ViT weights: mean/std 0.5
    deit = _timm_model("deit_tiny_distilled_patch16_224")  # DeiT: ImageNet mean/std
    data = DataConfig(path="x", image_size=32)
    with caplog.at_level(logging.WARNING, logger="distributed_attr.io.models"):
        notes = check_preprocessing(vit, data)
    assert [n.split(" differs")[0] for n in notes] == ["model: data.mean [0.485, 0.456, 0.406]",
                                                       "model: data.std [0.229, 0.224, 0.225]"]
    assert "timm's pretrained_cfg of 'vit_tiny_patch16_224" in notes[0] and len(caplog.records) == 2
    assert check_preprocessing(deit, data) == []  # and the patch embedding's 32 px, not the cfg's 224
    assert "input size 32" in check_preprocessing(deit, DataConfig(path="x", image_size=48))[0]


# --------------------------------------------------------------------------------------------
# A model directory on object storage, and a whole job
# --------------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    """An S3 server (moto) on loopback with one bucket."""
    pytest.importorskip("obstore")
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                 "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(k, v)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="models")
    yield client
    server.stop()


def test_a_huggingface_directory_on_object_storage(hf_vit, s3):
    original, d = hf_vit
    for f in d.iterdir():
        s3.upload_file(str(f), "models", f"vit/{f.name}")
    loaded = load_model(ModelConfig(kind="huggingface", weights="s3://models/vit/"))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _hf_logits(original, x), rtol=0, atol=0)
    assert loaded.preprocessing["source"] == "preprocessor_config.json in s3://models/vit/"
    with pytest.raises(ModelError, match=r"no model files under 's3://models/elsewhere'"):
        load_model(ModelConfig(kind="huggingface", weights="s3://models/elsewhere"))


def test_a_job_with_a_huggingface_model(hf_vit, parquet_dir, tmp_path):
    import zarr

    from distributed_attr.runner import run
    from tests.conftest import base_config

    _, d = hf_vit
    cfg = base_config(parquet_dir, tmp_path / "hf.zarr", unit_size=8)
    cfg["data"].update(limit=16, channels=3, mean=[0.5], std=[0.5])  # grey digits as RGB
    cfg["model"] = {"kind": "huggingface", "name": "tiny-vit", "weights": str(d), "num_classes": N_CLASSES}
    cfg["methods"] = {"saliency": {}, "gradcam": {}}
    summary = run(cfg, progress=False)
    assert summary.units_done == 2 and not summary.failures
    g = zarr.open_group(str(cfg["store"]), mode="r")
    assert g["ok"][:].all() and len(g["ok"][:]) == 16
    for method in ("saliency", "gradcam"):
        maps = g[f"maps/{method}"][:]
        assert maps.shape == (16, 32, 32) and np.isfinite(maps).all() and (np.abs(maps).sum(axis=(1, 2)) > 0).all()
    assert g.attrs["model_fingerprint"] == fingerprint(load_model(ModelConfig(kind="huggingface", weights=str(d))))
