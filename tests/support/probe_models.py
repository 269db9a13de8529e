"""Small models for the probe's checks, loaded through ``model.kind: callable``
(``probe_models:gelu_cnn``; the tests put this folder on ``sys.path``)."""
from __future__ import annotations

import torch
from torch import nn


def gelu_cnn(classes: int = 10) -> nn.Module:
    """A digits-size CNN (1 x 32 x 32 in) whose activations are GELUs and SiLUs, no ReLU: guided
    backpropagation has nothing to guide on it. Seeded weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GELU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
        ).eval()
