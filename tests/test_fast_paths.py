"""GPU fast paths against the float32 result (issue: keep the GPUs fed), on the demo's models.

Each fast path is optional and changes maps only within a documented tolerance
(docs/benchmarks-gpu.md, "Fast paths and their tolerance"); these tests hold them to it on the
CPU wherever the op exists there. Measured on 2026-11-30 over the three zoo models, 64 digits:
channels_last changes maps by float rounding only (relative L2 <= 1e-6 typically, per-map cosine
>= 0.9999); bfloat16 autocast changes input gradients by 10-25% relative L2 (per-map cosine >= 0.90
on the VGG, >= 0.97 on the others) and Grad-CAM/Occlusion by 1-3% (cosine >= 0.999)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_attr import zoo
from distributed_attr.config import Config
from distributed_attr.data import digits_uint8
from distributed_attr.pipeline import UnitProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {"saliency": {}, "integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}, "gradcam": {},
           "occlusion": {}}
#: least per-map cosine similarity to float32, by method family (the documented tolerance)
BF16_COSINE = {"gradcam": 0.999, "occlusion": 0.999}
BF16_COSINE_GRADIENT = 0.9
CHANNELS_LAST_COSINE = 0.9999


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    imgs, labels = digits_uint8(32, n=16)
    path = tmp_path_factory.mktemp("fast") / "x.npy"
    np.save(path, imgs)
    return path, torch.from_numpy(imgs).float().div(255).unsqueeze(1), torch.as_tensor(labels)


def processor(name: str, digits, **run) -> UnitProcessor:
    path, _, _ = digits
    cfg = Config.from_dict({
        "data": {"format": "numpy", "path": str(path), "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": str(path.parent / "unused.zarr"), "model": {"kind": "zoo", "name": name},
        "methods": METHODS, "spectra": {"enabled": False}, "run": {"num_workers": 0, **run}})
    model, _ = zoo.pretrained(name)
    return UnitProcessor(cfg, device="cpu", model=model)


def arrays(name: str, digits, proc: UnitProcessor | None = None, **run) -> dict[str, np.ndarray]:
    _, x, labels = digits
    proc = proc or processor(name, digits, **run)
    return proc.compute_batch(x, labels, torch.arange(len(x)))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet", "digits_vgg"])
def test_channels_last_changes_maps_by_rounding_only(name, digits):
    ref, got = arrays(name, digits), arrays(name, digits, channels_last=True)
    np.testing.assert_array_equal(ref["target"], got["target"])
    for method in METHODS:
        c = cosine(ref[f"maps/{method}"], got[f"maps/{method}"])
        assert c.min() >= CHANNELS_LAST_COSINE, (method, c.min())


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vgg"])
def test_bfloat16_autocast_keeps_maps_within_the_documented_tolerance(name, digits):
    ref, got = arrays(name, digits), arrays(name, digits, autocast="bfloat16")
    same = ref["target"] == got["target"]
    assert same.mean() >= 0.9, "bfloat16 changed the prediction of more than 1 image in 10"
    for method in METHODS:
        c = cosine(ref[f"maps/{method}"][same], got[f"maps/{method}"][same])
        least = BF16_COSINE.get(method, BF16_COSINE_GRADIENT)
        assert c.min() >= least, (method, c.min())
        # and bfloat16 really ran: a tolerance test that compares float32 with itself passes vacuously
        assert c.min() < 1 - 1e-7, method


def test_compile_gives_the_eager_maps(digits, monkeypatch):
    """torch.compile as the job uses it: dynamo captures the model, AOTAutograd its backward. The
    backend is ``aot_eager`` here because inductor's code generation takes minutes per input shape
    on this 2-core CPU; measured once with inductor on 2026-11-30: the same gradients to 2e-7."""
    real = torch.compile
    backends = []

    def compile_(model, **kwargs):
        backends.append("aot_eager")
        return real(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    proc = processor("digits_cnn", digits, compile=True)
    assert backends and proc.compiled is not None and proc.compile_error is None
    ref, got = arrays("digits_cnn", digits), arrays("digits_cnn", digits, proc)
    np.testing.assert_array_equal(ref["target"], got["target"])
    for method in METHODS:
        np.testing.assert_allclose(got[f"maps/{method}"], ref[f"maps/{method}"], rtol=1e-4,
                                   atol=1e-5 * np.abs(ref[f"maps/{method}"]).max(), err_msg=method)


def test_a_model_that_does_not_compile_runs_eagerly_and_says_why(digits, monkeypatch, caplog):
    def broken(model, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING"):
        proc = processor("digits_cnn", digits, compile=True)
    assert proc.compiled is None and "no C++ compiler found" in proc.compile_error
    assert "runs eagerly" in caplog.text and "no C++ compiler found" in caplog.text
    ref, got = arrays("digits_cnn", digits), arrays("digits_cnn", digits, proc)
    for method in METHODS:
        np.testing.assert_array_equal(got[f"maps/{method}"], ref[f"maps/{method}"], err_msg=method)
