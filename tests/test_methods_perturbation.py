"""Occlusion against Captum; RISE and Sobol against models whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_attr.methods import Context, build_method, compute_maps
from distributed_attr.methods.rise import rise_masks
from distributed_attr.methods.sobol import jansen_total_indices, sobol_design

captum_attr = pytest.importorskip("captum.attr")


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(ours, ref) -> float:
    ref = ref.detach().double()
    return float((ours.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double().eval()


class RegionModel(nn.Module):
    """Two classes; logit 0 = gain * (mean of channel-summed x over rows r0:r1, cols c0:c1 - offset),
    logit 1 = 0. Nothing outside the region matters."""

    def __init__(self, region=(4, 8, 8, 12), gain=6.0, offset=0.5):
        super().__init__()
        self.region, self.gain, self.offset = region, gain, offset

    def forward(self, x):
        r0, r1, c0, c1 = self.region
        inside = x[:, :, r0:r1, c0:c1].sum(dim=1).mean(dim=(1, 2))
        return torch.stack([self.gain * (inside - self.offset), torch.zeros_like(inside)], dim=1)


class CellSumModel(nn.Module):
    """One logit: sum_i w_i * mean of x over grid cell i (the additive model of the Sobol check)."""

    def __init__(self, weights: torch.Tensor, grid: int):
        super().__init__()
        self.weights, self.grid = weights, grid

    def forward(self, x):
        n, _, h, w = x.shape
        cells = x.sum(dim=1).reshape(n, self.grid, h // self.grid, self.grid, w // self.grid).mean(dim=(2, 4))
        return (cells.reshape(n, -1) * self.weights).sum(dim=1, keepdim=True)


# ------------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize("patch,stride,baseline", [(4, 2, 0.0), (5, 3, -0.5), (3, 3, 0.25)])
def test_occlusion_matches_captum(patch, stride, baseline):
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    x[:, :, :9, :7] = baseline  # windows in here are skipped: occluding them changes nothing
    t = torch.tensor([2, 0, 1])
    m = build_method("occlusion", {"patch": patch, "stride": stride, "baseline": baseline})
    ours = compute_maps(model, x, t, [m], Context(budget=37))["occlusion"]
    ref = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(2, patch, patch), strides=(1, stride, stride), baselines=baseline,
        target=t, perturbations_per_eval=16,
    )
    assert torch.equal(ref[:, 0], ref[:, 1])  # all channels occluded together
    assert rel_err(ours, ref[:, 0]) < 1e-4


def test_occlusion_skips_only_windows_that_change_nothing():
    model = small_cnn()
    seen = []
    model.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].clone()))
    x = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    x[0, 1, 7, 7] = 1.0  # one non-baseline pixel: only windows covering it are evaluated
    compute_maps(model, x, torch.tensor([0]), [build_method("occlusion", {"patch": 4, "stride": 2})], Context())
    evaluated = torch.cat(seen)[1:]  # after the clean image
    # windows start at 0, 2, 4 on each axis; only the one starting at (4, 4) covers (7, 7)
    assert evaluated.shape[0] == 1 and evaluated.abs().sum() == 0


def test_occlusion_probability_output_and_bad_params():
    model = small_cnn()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1])
    m = build_method("occlusion", {"patch": 4, "stride": 2, "output": "probability"})
    ours = compute_maps(model, x, t, [m], Context())["occlusion"]
    prob = lambda z: torch.softmax(model(z), dim=1)  # noqa: E731
    ref = captum_attr.Occlusion(prob).attribute(x, sliding_window_shapes=(2, 4, 4), strides=(1, 2, 2), target=t)
    assert rel_err(ours, ref[:, 0]) < 1e-4
    with pytest.raises(ValueError, match="stride"):
        build_method("occlusion", {"patch": 2, "stride": 3})


# ------------------------------------------------------------------------------- RISE


def test_rise_masks_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    cells = (torch.rand(200, 4, 4, generator=g) < 0.5).float()
    shifts = torch.randint(0, 4, (200, 2), generator=g)
    m = rise_masks(cells, shifts, 16, 16)
    assert m.shape == (200, 16, 16)
    assert m.min() >= 0 and m.max() <= 1
    # a zero shift crops the top-left of the bilinear upsampling of the 4x4 cells to 20x20
    up = torch.nn.functional.interpolate(cells[:1, None], size=(20, 20), mode="bilinear", align_corners=False)
    k = int(((shifts[:, 0] == 0) & (shifts[:, 1] == 0)).nonzero()[0])
    up = torch.nn.functional.interpolate(cells[k:k + 1, None], size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(m[k], up[0, 0, :16, :16])
    assert abs(float(m.mean()) - 0.5) < 0.05  # E[M] = p


def test_rise_puts_the_top_in_the_region_the_model_reads():
    model = RegionModel(region=(4, 8, 9, 13), gain=6.0, offset=0.5)
    x = torch.ones(2, 1, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 0])
    m = build_method("rise", {"masks": 1500, "grid": 4, "p": 0.5})
    sal = compute_maps(model, x, t, [m], Context(budget=512))["rise"]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 9:13] = True
    for s in sal:
        r, c = divmod(int(s.argmax()), 16)
        assert inside[r, c]
        assert s[inside].mean() > s[~inside].mean() + 0.1 * s.max()


def test_rise_saliency_is_the_score_weighted_mask_average():
    """With a model whose probability is constant c, saliency = c * mean(M) / p ~ c everywhere."""
    model = RegionModel(region=(0, 14, 0, 14), gain=0.0)  # logits (0, 0) whatever x: p = 0.5
    x = torch.rand(1, 1, 14, 14, dtype=torch.float64)
    m = build_method("rise", {"masks": 800, "grid": 7, "p": 0.3})
    sal = compute_maps(model, x, torch.tensor([0]), [m], Context())["rise"]
    assert abs(float(sal.mean()) - 0.5) < 0.03


# ------------------------------------------------------------------------------- Sobol


def test_sobol_design_structure():
    d, n = 5, 16
    rows = sobol_design(d, n, seed=3)
    assert rows.shape == (n * (d + 2), d)
    a, b, c = rows[:n], rows[n:2 * n], rows[2 * n:].reshape(d, n, d)
    for i in range(d):
        expected = a.copy()
        expected[:, i] = b[:, i]
        np.testing.assert_array_equal(c[i], expected)
    # a scrambled Sobol sequence: each column of A is stratified (one point per 1/n interval)
    for col in a.T:
        assert sorted(np.floor(col * n).astype(int)) == list(range(n))


def test_sobol_total_indices_of_an_additive_model_match_the_closed_form():
    grid = 4
    w = torch.tensor([3.0, -1.0, 0.0, 2.0, 0.5, 0.0, -2.5, 1.0, 0.0, 0.2, 1.5, -0.7, 0.0, 0.0, 4.0, 1.0],
                     dtype=torch.float64)
    model = CellSumModel(w, grid)
    x = torch.ones(1, 1, 16, 16, dtype=torch.float64)
    method = build_method("sobol", {"grid": grid, "design": 1024, "output": "logit"})
    st = method.total_indices(model, x, torch.tensor([0]), Context(budget=4096))[0].flatten()
    # independent U(0, 1) mask variables, Var = 1/12 for all: ST_i = w_i^2 / sum_j w_j^2
    expected = w**2 / (w**2).sum()
    assert float((st - expected).abs().max()) < 0.005  # measured 0.001 at 1024 points, 0.11 at 32
    assert torch.equal(st[w == 0], torch.zeros_like(st[w == 0]))


def test_jansen_estimator_on_a_known_function():
    """f = a1 + a2 * a3 with a_i ~ U(0, 1): V = 1/12 + Var(a2 a3), ST_1 = (1/12) / V and
    ST_2 = ST_3 = E[Var(a2 a3 | a3)] / V = E[a3^2] / 12 / V = (1/36) / V."""
    d, n = 3, 2**14
    rows = torch.from_numpy(sobol_design(d, n, seed=0))
    f = rows[:, 0] + rows[:, 1] * rows[:, 2]
    st = jansen_total_indices(f[None], d, n)[0]
    var = 1 / 12 + (1 / 9 - 1 / 16)  # Var(a2 a3) = E[a2^2] E[a3^2] - (E a2 E a3)^2
    expected = torch.tensor([1 / 12 / var, 1 / 36 / var, 1 / 36 / var], dtype=torch.float64)
    assert float((st - expected).abs().max()) < 0.01


def test_sobol_puts_the_top_in_the_region_the_model_reads():
    model = RegionModel(region=(8, 12, 4, 8), gain=3.0)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) + 0.5
    m = build_method("sobol", {"grid": 4, "design": 32, "output": "probability"})
    sal = compute_maps(model, x, torch.tensor([0, 0]), [m], Context(budget=2048))["sobol"]
    st = m.total_indices(model, x, torch.tensor([0, 0]), Context(budget=2048))
    assert sal.shape == (2, 16, 16)
    for s, cells in zip(sal, st):
        assert int(cells.flatten().argmax()) == 2 * 4 + 1  # the cell at rows 8:12, cols 4:8
        assert float(cells.flatten().sort().values[-2]) == 0.0  # the other cells do not matter
        r, c = divmod(int(s.argmax()), 16)
        assert 8 <= r < 12 and 4 <= c < 8
