"""Sparseness and complexity equal Quantus 0.6 on the same inputs (one image per call, since
Quantus normalises by the maximum of the whole batch it is given)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distributed_attr.metrics import evaluate


def maps_and_images():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, 16, 16, generator=g)
    maps[1] = maps[1] ** 5  # heavy-tailed: sparse
    maps[2] = 0.0
    maps[2, 3, 4] = 2.0  # one pixel: sparsest, simplest
    maps[3] = maps[3].abs() + 3.0  # nearly flat
    return torch.rand(4, 1, 16, 16, generator=g), maps


@pytest.mark.parametrize("name,output,quantus_name", [("sparseness", "gini", "Sparseness"),
                                                      ("complexity", "entropy", "Complexity")])
def test_equal_to_quantus(name, output, quantus_name):
    import quantus

    x, maps = maps_and_images()
    ours = evaluate(None, x, maps, name)[output].double().numpy()
    metric = getattr(quantus, quantus_name)(disable_warnings=True)
    ref = [
        metric(model=None, x_batch=x[i : i + 1].numpy(), y_batch=np.zeros(1, dtype=int),
               a_batch=maps[i : i + 1, None].numpy().copy())[0]
        for i in range(4)
    ]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_extremes_and_ordering():
    x, maps = maps_and_images()
    gini = evaluate(None, x, maps, "sparseness")["gini"]
    ent = evaluate(None, x, maps, "complexity")["entropy"]
    assert gini[2] > gini[1] > gini[0] > gini[3]
    assert ent[2] < ent[1] < ent[0] < ent[3] <= math.log(256) + 1e-6
    assert ent[2].item() == pytest.approx(0.0, abs=1e-6)
    norm = evaluate(None, x, maps, "complexity", normalise=True)["entropy"]
    np.testing.assert_allclose(norm.numpy(), ent.numpy() / math.log(256), rtol=1e-6)
    # a zero map: uniform (Gini 0, entropy log n) instead of Quantus's NaN
    zero = torch.zeros(1, 16, 16)
    assert evaluate(None, x[:1], zero, "sparseness")["gini"].item() == pytest.approx(0.0, abs=1e-6)
    assert evaluate(None, x[:1], zero, "complexity")["entropy"].item() == pytest.approx(math.log(256), abs=1e-5)
