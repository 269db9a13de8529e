"""Localisation metrics against Quantus 0.6 on the same maps and masks, closed forms (a map equal
to the mask is perfect, a random map scores chance), ties against Quantus averaged over random
tie-breaks, and the places where we differ from Quantus on purpose."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_attr.metrics import build_metric, list_metrics
from distributed_attr.metrics.base import MetricContext
from distributed_attr.registry import RegistryError

H = W = 16
NAMES = ["pointing_game", "attribution_localisation", "top_k_intersection",
         "relevance_mass_accuracy", "relevance_rank_accuracy", "auc"]
QUANTUS = {"pointing_game": "PointingGame", "attribution_localisation": "AttributionLocalisation",
           "top_k_intersection": "TopKIntersection", "relevance_mass_accuracy": "RelevanceMassAccuracy",
           "relevance_rank_accuracy": "RelevanceRankAccuracy", "auc": "AUC"}


def score(name: str, maps: torch.Tensor, masks: torch.Tensor | None, **params) -> torch.Tensor:
    metric = build_metric(name, params)
    x = torch.zeros(maps.shape[0], 1, *maps.shape[1:])
    out = metric.evaluate(None, x, maps, torch.zeros(maps.shape[0], dtype=torch.int64), MetricContext(masks=masks))
    return out[metric.score_output]


def quantus_score(name: str, maps: torch.Tensor, masks: torch.Tensor, **params) -> np.ndarray:
    import quantus

    metric = getattr(quantus, QUANTUS[name])(disable_warnings=True, **params)
    n = maps.shape[0]
    out = metric(model=None, x_batch=np.zeros((n, 1, *maps.shape[1:]), np.float32), y_batch=np.zeros(n, int),
                 a_batch=maps[:, None].numpy().astype(np.float32), s_batch=masks[:, None].numpy().astype(np.float32))
    return np.asarray(out, dtype=np.float64)


def shared_inputs():
    """Six images: random signed maps and structured ones (a blob on the object, a blob beside it,
    a heavy-tailed map), masks of every kind (square, two blobs, one pixel, most of the image,
    the whole image, an L shape). No ties in the maps."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, H, W, generator=g)
    masks = torch.zeros(6, H, W, dtype=torch.bool)
    masks[0, 2:8, 3:9] = True
    masks[1, 1:4, 1:4] = True
    masks[1, 10:15, 9:13] = True
    masks[2, 7, 11] = True
    masks[3, 1:15, 2:16] = True
    masks[4] = True
    masks[5, 4:12, 4:7] = True
    masks[5, 9:12, 4:12] = True
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    blob = lambda cy, cx, s: torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    maps[0] = 3 * blob(5, 6, 2.0) + 0.3 * maps[0]  # on the object
    maps[1] = 2 * blob(12, 3, 2.5) - blob(2, 2, 1.0) + 0.2 * maps[1]  # beside it, negative on it
    maps[5] = maps[5] ** 3  # heavy tailed
    return maps, masks


PARAMS = [
    ("pointing_game", {}),
    ("pointing_game", {"abs": True}),
    ("attribution_localisation", {}),
    ("attribution_localisation", {"abs": False, "positive_attributions": True}),
    ("top_k_intersection", {"k": 30}),
    ("top_k_intersection", {"k": 7, "abs": True, "concept_influence": True}),
    ("relevance_mass_accuracy", {}),
    ("relevance_mass_accuracy", {"abs": True}),
    ("relevance_rank_accuracy", {}),
    ("relevance_rank_accuracy", {"abs": True}),
    ("auc", {}),
    ("auc", {"abs": True}),
]


@pytest.mark.filterwarnings("ignore:No negative samples")  # scikit-learn, on the full mask
@pytest.mark.parametrize("name,params", PARAMS)
def test_equal_to_quantus_on_shared_maps_and_masks(name, params):
    maps, masks = shared_inputs()
    ours = score(name, maps, masks, **params).double().numpy()
    ref = quantus_score(name, maps, masks, **params)
    # full mask (image 4): AUC is NaN in both (no negative pixel); every other score is a number
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-7, equal_nan=True)
    assert np.isnan(ours[4]) == (name == "auc")


def test_a_map_equal_to_the_mask_is_perfect_and_a_random_map_scores_chance():
    maps, masks = shared_inputs()
    keep = [0, 1, 2, 3, 5]  # not the full mask: AUC is undefined there
    truth = masks[keep].float()
    k = int(masks[keep].sum((1, 2)).min())  # top-k is perfect when k <= |mask| (else |mask| / k)
    for name in NAMES:
        params = {"k": k} if name == "top_k_intersection" else {}
        got = score(name, truth, masks[keep], **params)
        torch.testing.assert_close(got, torch.ones(len(keep)), atol=1e-6, rtol=0, msg=name)

    # Random maps independent of random rectangles: 600 images of 16 x 16. Chance is the mask's
    # share of the image p = K/F for every metric but AUC (1/2); a nonnegative map for relevance
    # mass accuracy (with a signed map it is a ratio of sums near 0: no mean).
    g = torch.Generator().manual_seed(1)
    n = 600
    masks = torch.zeros(n, H, W, dtype=torch.bool)
    for i in range(n):
        y0, x0 = torch.randint(0, H - 2, (2,), generator=g).tolist()
        hh, ww = torch.randint(2, H + 1, (2,), generator=g).tolist()
        masks[i, y0:y0 + hh, x0:x0 + ww] = True
    p = masks.double().mean((1, 2))
    signed = torch.randn(n, H, W, generator=g)
    positive = torch.rand(n, H, W, generator=g)
    chance = {"pointing_game": p, "attribution_localisation": p, "top_k_intersection": p,
              "relevance_mass_accuracy": p, "relevance_rank_accuracy": p, "auc": torch.full((n,), 0.5)}
    for name in NAMES:
        maps = positive if name == "relevance_mass_accuracy" else signed
        params = {"k": 25} if name == "top_k_intersection" else {}
        got = score(name, maps, masks, **params).double()
        # pointing game: Bernoulli(p) per image; the others average many pixels: far tighter
        spread = (p * (1 - p)).sum().sqrt() / n if name == "pointing_game" else 0.01
        assert abs(got.mean() - chance[name].mean()) < 4 * spread, (name, got.mean(), chance[name].mean())
        assert got.mean() < 0.9  # far from the perfect score
    ci = score("top_k_intersection", signed, masks, k=25, concept_influence=True).double()
    assert abs(ci.mean() - 1.0) < 0.1  # concept influence divides by p: chance is 1


def test_ties_are_broken_at_random_in_expectation():
    """A map with plateaus (4 x 4 blocks, as Occlusion gives) straddling the mask: our score is
    Quantus's averaged over random tie-breaks (the map plus tiny random jitter, 2000 draws); AUC
    is exactly Quantus's (scikit-learn gives ties half credit)."""
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 4, (1, 4, 4), generator=g).float()
    blocks[0, 1, 1] = blocks.max() + 1  # one top block, so the pointing game has a 16-pixel plateau
    plateau = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (1, 16, 16), 4 levels
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 2:11, 3:7] = True  # cuts blocks in parts
    draws = 2000
    jittered = plateau + 1e-4 * torch.rand(draws, H, W, generator=g)
    masks = mask.expand(draws, H, W).contiguous()
    for name, params in [("pointing_game", {}), ("top_k_intersection", {"k": 40}),
                         ("relevance_rank_accuracy", {})]:
        ours = score(name, plateau, mask, **params).item()
        mc = quantus_score(name, jittered, masks, **params)
        se = mc.std() / np.sqrt(draws)
        assert abs(ours - mc.mean()) < 4 * se + 1e-9, (name, ours, mc.mean(), se)
        assert 0 < ours < 1
    np.testing.assert_allclose(score("auc", plateau, mask).numpy(), quantus_score("auc", plateau, mask), rtol=1e-7)


def test_flat_map_scores_chance_where_quantus_scores_a_hit():
    """Quantus's pointing game counts a hit when any maximal pixel is on the object, so a flat
    map hits every non-empty mask; ours is the expected hit under a random choice among the
    maxima: the mask's share. Top-k and rank accuracy: the mask's share too (Quantus: NumPy's
    sort order, here the first pixels in raster order)."""
    _, masks = shared_inputs()
    keep = [0, 1, 2, 3, 5]
    flat = torch.full((len(keep), H, W), 0.5)
    share = masks[keep].double().mean((1, 2)).float()
    torch.testing.assert_close(score("pointing_game", flat, masks[keep]), share)
    torch.testing.assert_close(score("top_k_intersection", flat, masks[keep], k=10), share)
    torch.testing.assert_close(score("relevance_rank_accuracy", flat, masks[keep]), share)
    torch.testing.assert_close(score("auc", flat, masks[keep]), torch.full((len(keep),), 0.5))
    # Quantus refuses a batch where every value is equal: one flat map beside a random one
    mixed = torch.stack([flat[0], torch.randn(H, W, generator=torch.Generator().manual_seed(3))])
    assert quantus_score("pointing_game", mixed, masks[[0, 0]])[0] == 1.0
    # an all-zero map (a Grad-CAM whose ReLU removed everything) is chance, not a hit
    assert score("pointing_game", torch.zeros(1, H, W), masks[:1]).item() == pytest.approx(share[0].item())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # Quantus's, on the empty mask
def test_empty_mask_is_nan_where_quantus_pointing_game_says_hit():
    maps, masks = shared_inputs()
    empty = masks.clone()
    empty[2] = False
    for name in NAMES:
        params = {"k": 5} if name == "top_k_intersection" else {}
        out = score(name, maps, empty, **params)
        assert torch.isnan(out[2]) and not torch.isnan(out[0]), name
    # Quantus writes NaN into a boolean array, which stores True
    assert quantus_score("pointing_game", maps, empty)[2] == 1.0
    for name in NAMES[1:]:
        params = {"k": 5} if name == "top_k_intersection" else {}
        assert np.isnan(quantus_score(name, maps, empty, **params)[2]), name


def test_pointing_game_tolerance_is_euclidean_distance_to_the_mask():
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 5, 5] = True
    maps = torch.zeros(1, H, W)
    maps[0, 8, 9] = 1.0  # 3 rows and 4 columns away: distance 5
    for tol, hit in [(0, 0.0), (4, 0.0), (5, 1.0), (15, 1.0)]:
        assert score("pointing_game", maps, mask, tolerance=tol).item() == hit, tol
    # the tolerance does not turn an empty mask into a hit
    assert torch.isnan(score("pointing_game", maps, torch.zeros_like(mask), tolerance=15)).all()


def test_scores_are_per_image_and_masks_may_be_integers():
    maps, masks = shared_inputs()
    for name in NAMES:
        params = {"k": 5} if name == "top_k_intersection" else {}
        whole = score(name, maps, masks, **params)
        part = score(name, maps[3:], masks[3:].to(torch.uint8), **params)
        torch.testing.assert_close(whole[3:], part, equal_nan=True)


def test_missing_or_misshapen_masks_and_bad_parameters_are_named():
    maps, masks = shared_inputs()
    with pytest.raises(ValueError, match=r"'relevance_rank_accuracy' needs ground-truth masks.*data.mask_column"):
        score("relevance_rank_accuracy", maps, None)
    with pytest.raises(ValueError, match=r"'auc': ground-truth masks must have the maps' shape"):
        score("auc", maps, masks[:, :8])
    with pytest.raises(ValueError, match=r"k = 1000 exceeds the 256 pixels.*top_k_intersection.k <= 256"):
        score("top_k_intersection", maps, masks)
    with pytest.raises(RegistryError, match="k must be >= 1"):
        build_metric("top_k_intersection", {"k": 0})
    with pytest.raises(RegistryError, match="valid parameters: abs=False, tolerance=0"):
        build_metric("pointing_game", {"weighted": True})
    info = list_metrics()
    for name in NAMES:
        cls = type(build_metric(name))
        assert info[name]["higher_is_better"] is True and info[name]["needs_model"] is False
        assert cls.needs_masks is True and cls.needs_explain is False
    assert info["top_k_intersection"]["params"]["k"] == 1000
    assert info["attribution_localisation"]["params"]["abs"] is True
