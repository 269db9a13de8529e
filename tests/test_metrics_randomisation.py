"""The cascading randomisation check against Quantus 0.6's MPRT fed the same explanation function."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_attr import zoo
from distributed_attr.methods import attribute
from distributed_attr.metrics import randomisation_check
from distributed_attr.metrics.randomisation import randomisable_layers


@pytest.fixture(scope="module")
def digits():
    model, _ = zoo.pretrained("digits_cnn")
    x, y = zoo.digits_dataset(32)
    return model, torch.from_numpy(x[:3]), torch.from_numpy(y[:3])


def test_matches_quantus_mprt(digits):
    import quantus

    model, x, y = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = randomisation_check(model, x, "gradient_x_input", y, seed=41)

    def explain(model, inputs, targets, **kwargs):
        maps = attribute(model, torch.as_tensor(inputs), "gradient_x_input", torch.as_tensor(targets))
        return maps[:, None].numpy()

    metric = quantus.MPRT(seed=41, disable_warnings=True)
    ref = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                 explain_func=explain, device="cpu")
    ref.pop("original")
    assert list(ours) == list(ref) == randomisable_layers(model)[::-1]
    for layer in ours:
        np.testing.assert_allclose(ours[layer].numpy(), ref[layer], atol=1e-5, err_msg=layer)
    # the model itself is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_layers_off_the_path_do_not_change_the_map():
    torch.manual_seed(0)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))

        def forward(self, x):
            return self.body(x)

    model = WithUnused().eval()
    x = torch.rand(2, 1, 8, 8)
    out = randomisation_check(model, x, "saliency", [0, 1], layers_order=["unused", "body.3"])
    assert list(out) == ["unused", "body.3"]
    np.testing.assert_allclose(out["unused"].numpy(), 1.0, atol=1e-6)
    assert (out["body.3"] < 0.99).all()
    with pytest.raises(ValueError, match="randomisable layers"):
        randomisation_check(model, x, "saliency", [0, 1], layers_order=["nope"])
