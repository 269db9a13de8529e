"""Models for benchmarks, loaded by actors through ``model.kind: callable``."""
from torch import nn


def tiny_linear() -> nn.Module:
    """Next to no compute: 8x8 grey images to 10 classes through one linear layer, so that a job
    of one-image units measures the driver, not the model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def small_rgb_cnn(num_classes: int = 10) -> nn.Module:
    """A small ResNet-like stem for 96-px RGB images: a few milliseconds of forward+backward per
    image on one CPU thread, comparable to decoding a large JPEG (bench/overlap.py)."""
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
