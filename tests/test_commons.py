"""The per-batch context is immutable; the sample budget is the one state batches share.

Out-of-memory errors are simulated by a model that raises CUDA's message when a forward pass holds
more samples than it "fits"; everything else is real (the methods, the pipeline's processor)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from distributed_attr.commons import BatchContext, SampleBudget, run_in_chunks
from distributed_attr.config import Config
from distributed_attr.methods import Context, build_method, compute_maps
from distributed_attr.metrics.base import MetricContext
from distributed_attr.pipeline import UnitProcessor


class FitsAtMost(nn.Module):
    """A small CNN whose forward raises CUDA's out-of-memory message above ``limit`` samples and
    records the size of every pass it ran."""

    def __init__(self, limit: int, channels: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(16, 3))
        self.limit = limit
        self.passes: list[int] = []

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {x.shape[0]} samples")
        self.passes.append(x.shape[0])
        return self.net(x)


def test_contexts_are_immutable_and_replacements_share_the_budget():
    ctx = Context(seed=3, budget=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.indices = torch.arange(2)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ctx.max_batch = 8  # type: ignore[misc]
    batch = dataclasses.replace(ctx, indices=torch.arange(4))
    assert batch.budget is ctx.budget and ctx.indices is None
    batch.budget.lower_after_oom(64)
    assert ctx.max_batch == batch.max_batch == 32
    assert Context(budget=0).max_batch == 1  # never below one sample
    assert isinstance(MetricContext(budget=5).budget, SampleBudget)


def test_an_out_of_memory_pass_lowers_the_budget_for_every_later_call():
    ctx = BatchContext(budget=16)
    seen = []

    def fn(sl: slice) -> torch.Tensor:
        n = sl.stop - sl.start
        if n > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        seen.append(n)
        return torch.arange(sl.start, sl.stop)

    out = run_in_chunks(fn, 10, ctx)
    assert torch.equal(out, torch.arange(10))
    assert seen == [2, 2, 2, 2, 2] and ctx.max_batch == 2  # 16 -> 8 -> 4 -> 2
    seen.clear()
    run_in_chunks(fn, 4, dataclasses.replace(ctx, seed=1))  # a later batch starts at the size that fitted
    assert seen == [2, 2]


def test_a_view_per_item_lowers_its_parent():
    budget = SampleBudget(64)
    per_image = budget.per(8)  # an image puts 8 samples into a pass
    assert per_image.size == 8
    per_image.lower_after_oom(8)
    assert (per_image.size, budget.size) == (4, 32)
    budget.lower_after_oom(10)
    assert (per_image.size, budget.size) == (1, 5)
    # a budget already lower than the failed pass stays where it is
    budget.lower_after_oom(64)
    assert budget.size == 5


def test_soundness_out_of_memory_lowers_the_callers_budget_by_whole_images():
    """Soundness chunks hold whole images with all their references; an out-of-memory error in
    the chunks must lower the caller's budget, counted in samples (it wrote ``ctx.max_batch`` back
    by hand before the context was immutable)."""
    torch.manual_seed(1)
    x = torch.rand(6, 1, 8, 8)
    refs = torch.rand(5, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    method = build_method("soundness_saliency", {"steps": 2, "backgrounds": 4, "downsample": 2})
    model = FitsAtMost(limit=8)
    ctx = Context(budget=64, references=refs)
    small = compute_maps(model, x, target, [method], ctx)["soundness_saliency"]
    assert ctx.max_batch == 8 and max(model.passes) <= 8
    fitted = FitsAtMost(limit=8)
    fitted.load_state_dict(model.state_dict())
    again = compute_maps(fitted, x, target, [method], Context(budget=8, references=refs))["soundness_saliency"]
    torch.testing.assert_close(small, again)
    assert not [n for n in fitted.passes if n > 8]


def test_the_processor_keeps_what_an_out_of_memory_error_taught_across_batches(tmp_path):
    """The sample budget lowered in one batch holds for the next one and for the metrics."""
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((8, 8, 8), np.uint8))
    cfg = Config.from_dict({
        "data": {"format": "numpy", "path": str(path), "image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": str(tmp_path / "unused.zarr"), "methods": {"integrated_gradients": {"steps": 8}},
        "metrics": {"deletion": {"steps": 4}}, "spectra": {"enabled": False},
        "run": {"num_workers": 0, "max_batch": 64, "decode_workers": 0}})
    model = FitsAtMost(limit=16)
    proc = UnitProcessor(cfg, device="cpu", model=model)
    x = torch.rand(4, 1, 8, 8)
    proc.compute_batch(x, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert proc.budget.size == 16 and proc.ctx.max_batch == 16
    model.passes.clear()
    proc.compute_batch(x, torch.zeros(4, dtype=torch.long), torch.arange(4, 8))
    # the second batch never tried a pass the first one found too large
    assert model.passes and max(model.passes) <= 16


def test_a_batch_that_fails_leaves_the_budget_as_it_found_it(tmp_path):
    """Sizes lowered by a batch that then fails (its unit fails) are not kept: they were learnt
    from a batch that proved nothing, and a replica left at one sample per pass would be slow
    for the rest of its life."""
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 8, 8), np.uint8))
    cfg = Config.from_dict({
        "data": {"format": "numpy", "path": str(path), "image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": str(tmp_path / "unused.zarr"), "methods": {"integrated_gradients": {"steps": 8}, "saliency": {}},
        "spectra": {"enabled": False}, "run": {"num_workers": 0, "max_batch": 64, "decode_workers": 0}})

    class FailsLater(FitsAtMost):
        def forward(self, x):
            if len(self.passes) >= 3:  # after IG's passes fit at 16: a bug in a later method
                raise ValueError("boom")
            return super().forward(x)

    proc = UnitProcessor(cfg, device="cpu", model=FailsLater(limit=16))
    with pytest.raises(ValueError, match="boom"):
        proc.compute_batch(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert proc.model.passes and max(proc.model.passes) <= 16  # the budget was lowered on the way ...
    assert proc.budget.size == 64  # ... and is back
