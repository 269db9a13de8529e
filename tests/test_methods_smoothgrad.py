"""SmoothGrad, SquareGrad and VarGrad against Captum's NoiseTunnel fed with our noisy samples."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distributed_attr.methods import Context, build_method, compute_maps
from distributed_attr.methods.smoothgrad import NoiseSampler, noise_sigma

captum_attr = pytest.importorskip("captum.attr")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double().eval()


def make_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 2, 12, 12, generator=g, dtype=torch.float64) * 3 - 1
    return x, torch.tensor([1, 0, 3])


def rel_err(ours, ref) -> float:
    ref = ref.detach().double()
    return float((ours.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


SAMPLES, LEVEL = 6, 0.2
CAPTUM_TYPE = {"smoothgrad": "smoothgrad", "squaregrad": "smoothgrad_sq", "vargrad": "vargrad"}


@pytest.mark.parametrize("name", ["smoothgrad", "squaregrad", "vargrad"])
def test_matches_captum_noise_tunnel_on_the_same_noise(name, monkeypatch):
    model, (x, t) = make_model(), make_inputs()
    ctx = Context(seed=5, budget=4)
    ours = compute_maps(model, x, t, [build_method(name, {"samples": SAMPLES, "noise_level": LEVEL})], ctx)[name]

    noise = NoiseSampler(x, Context(seed=5), SAMPLES, LEVEL).all_noise(dtype=torch.float64)
    flat = noise.reshape(-1, *x.shape[1:])  # image-major, Captum's repeat_interleave order
    monkeypatch.setattr(torch, "normal", lambda *a, **k: flat.clone())
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(model))
    ref = nt.attribute(x, nt_type=CAPTUM_TYPE[name], nt_samples=SAMPLES, stdevs=1.0, target=t, abs=False)
    assert rel_err(ours, ref.sum(dim=1)) < 1e-4


def test_noise_scale_is_a_fraction_of_each_images_range():
    x = torch.zeros(2, 1, 40, 40, dtype=torch.float64)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, 10.0
    assert torch.allclose(noise_sigma(x, 0.1), torch.tensor([0.1, 1.0], dtype=torch.float64))
    noise = NoiseSampler(x, Context(), 400, 0.1).all_noise(dtype=torch.float64)
    std = noise.reshape(2, -1).std(dim=1)
    assert torch.allclose(std, torch.tensor([0.1, 1.0], dtype=torch.float64), rtol=0.01)


def test_group_shares_samples_and_equals_members_alone():
    model, (x, t) = make_model(), make_inputs()
    calls = []
    model.register_forward_pre_hook(lambda mod, inp: calls.append(inp[0].shape[0]))
    names = ["smoothgrad", "squaregrad", "vargrad"]
    ctx = Context(budget=64)
    together = compute_maps(model, x, t, [build_method(n, {"samples": SAMPLES}) for n in names], ctx)
    assert calls == [3 * SAMPLES]  # one pass over the samples for the three methods
    for n in names:
        alone = compute_maps(model, x, t, [build_method(n, {"samples": SAMPLES})], ctx)[n]
        assert torch.equal(together[n], alone)
    # vargrad = squaregrad - smoothgrad^2 per channel: with one channel summed it is bounded
    assert (together["vargrad"] <= together["squaregrad"] + 1e-12).all()


def test_members_with_different_params_do_not_share():
    model, (x, t) = make_model(), make_inputs()
    ms = [build_method("smoothgrad", {"samples": 2}), build_method("vargrad", {"samples": 3})]
    out = compute_maps(model, x, t, ms, Context())
    alone = compute_maps(model, x, t, [build_method("vargrad", {"samples": 3})], Context())
    assert torch.equal(out["vargrad"], alone["vargrad"])


def test_zero_noise_gives_the_plain_gradient():
    model, (x, t) = make_model(), make_inputs()
    sg = compute_maps(model, x, t, [build_method("smoothgrad", {"samples": 2, "noise_level": 0.0})], Context())
    grad = captum_attr.Saliency(model).attribute(x, target=t, abs=False).sum(dim=1)
    assert rel_err(sg["smoothgrad"], grad) < 1e-6  # maps are stored as float32
    vg = compute_maps(model, x, t, [build_method("vargrad", {"samples": 2, "noise_level": 0.0})], Context())
    assert vg["vargrad"].abs().max() < 1e-12
