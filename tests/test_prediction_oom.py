"""An out-of-memory error in a unit's prediction pass (the forward pass that gives each image's
prediction, probability and target before the methods run) is retried in smaller chunks, as the
methods' passes are: the arrays equal those of a run that never ran out of memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_attr.config import Config
from distributed_attr.pipeline import UnitProcessor

from tests.conftest import base_config

pytestmark = pytest.mark.usefixtures("one_thread")


class OutOfMemoryAbove(nn.Module):
    """The wrapped model, raising torch's real out-of-memory error for a pass of more than
    ``limit`` images (as a GPU that cannot hold them would); records the size of every pass."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit, self.passes = inner, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        self.passes.append(x.shape[0])
        return self.inner(x)


def test_an_out_of_memory_error_in_the_prediction_pass_is_retried_smaller(tmp_path, parquet_dir, zoo_cnn,
                                                                          digits_small):
    cfg = base_config(parquet_dir, tmp_path / "s.zarr", batch_size=8, max_batch=64)
    cfg["methods"] = {"saliency": {}, "gradcam": {}}
    cfg = Config.from_dict(cfg)
    images, labels = digits_small
    x = torch.as_tensor(images[:8, None], dtype=torch.float32) / 255.0
    y, idx = torch.as_tensor(labels[:8]), torch.arange(8)
    reference = UnitProcessor(cfg, device="cpu", model=OutOfMemoryAbove(zoo_cnn[0], limit=64))
    expected = reference.compute_batch(x, y, idx)
    small = OutOfMemoryAbove(zoo_cnn[0], limit=3)
    proc = UnitProcessor(cfg, device="cpu", model=small)
    got = proc.compute_batch(x, y, idx)
    assert set(got) == set(expected)
    for key in expected:
        if expected[key].dtype.kind in "iub":
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        else:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert max(small.passes) <= 3 and proc.budget.size <= 3  # the lower size holds for later batches
    small.passes.clear()
    proc.compute_batch(x, y, idx)
    assert small.passes and max(small.passes) <= 3
