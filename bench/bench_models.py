"""Models for benchmarks, loaded by actors through ``model.kind: callable``."""
from torch import nn


def tiny_linear() -> nn.Module:
    """Next to no compute: 8x8 grey images to 10 classes through one linear layer, so that a job
    of one-image units measures the driver, not the model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
