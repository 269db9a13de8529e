"""The benchmark's classifier: a small ResNet with four stride-2 stages, plain or anti-aliased.

``BenchmarkResNet`` downsamples 128 px inputs four times (stem, then three residual stages:
128 -> 64 -> 32 -> 16 -> 8), each time with a strided convolution (3x3 in the main path, 1x1 on
the shortcut). With ``anti_aliased=True`` every one of those strided convolutions is a
``BlurConv2d``: it blurs its input with a fixed binomial filter before convolving with stride 2.
Convolution and blur are linear and shift-invariant, so this equals the convolution at stride 1,
then the blur, then subsampling (BlurPool: Zhang, "Making Convolutional Networks Shift-Invariant
Again", ICML 2019; what ``distributed_attr.spectral.downsampling.antialiased`` builds) everywhere
except at the border, at a quarter of the cost. Both variants have the same parameters and the same
``state_dict`` keys (the blur kernel is a fixed, non-persistent buffer), so weights load into either.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: ImageNet statistics: the product's default ``data.mean`` / ``data.std``, so a job config needs none
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def binomial_kernel(size: int) -> torch.Tensor:
    """The 2-D binomial filter of ``size`` taps per axis (3: [1, 2, 1] x [1, 2, 1] / 16)."""
    row = torch.tensor([float(math.comb(size - 1, k)) for k in range(size)], dtype=torch.float64)
    k = torch.outer(row, row)
    return (k / k.sum()).to(torch.float32)


class BlurConv2d(nn.Conv2d):
    """A strided ``Conv2d`` whose input is first low-passed by a fixed binomial filter
    (``filter_size`` taps, reflect padding, stride 1, channel by channel): blur before subsampling.
    Same parameters and ``state_dict`` as the ``Conv2d`` it replaces."""

    def __init__(self, *args, filter_size: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        if filter_size < 1 or filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd and >= 1, got {filter_size}")
        self.filter_size = int(filter_size)
        self.register_buffer("blur_kernel", binomial_kernel(self.filter_size)[None, None], persistent=False)

    def forward(self, x):
        c = x.shape[1]
        p = self.filter_size // 2
        if p:
            k = self.blur_kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, -1, -1)
            x = F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), k, groups=c)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blur={self.filter_size}"


def _strided_conv(cin: int, cout: int, kernel: int, anti_aliased: bool, filter_size: int) -> nn.Module:
    """A stride-2 convolution; anti-aliased, its input is blurred first."""
    if anti_aliased:
        return BlurConv2d(cin, cout, kernel, stride=2, padding=kernel // 2, bias=False, filter_size=filter_size)
    return nn.Conv2d(cin, cout, kernel, stride=2, padding=kernel // 2, bias=False)


class _Block(nn.Module):
    """A basic residual block that halves the resolution (3x3 conv s2, 3x3 conv; 1x1 s2 shortcut)."""

    def __init__(self, cin: int, cout: int, anti_aliased: bool, filter_size: int):
        super().__init__()
        self.conv1 = _strided_conv(cin, cout, 3, anti_aliased, filter_size)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(_strided_conv(cin, cout, 1, anti_aliased, filter_size), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class BenchmarkResNet(nn.Module):
    """Stem (3x3 conv, stride 2) and three residual stages (stride 2 each): channels ``width``,
    2, 4, 8 x ``width``; global average pooling; a linear classifier. Expects inputs normalised
    with ``MEAN``/``STD`` (ImageNet's, the product's default), any size divisible by 16.

    ``layer3`` ends the convolutional trunk (an 8 x 8 grid at 128 px): the layer Grad-CAM finds."""

    def __init__(self, in_channels: int = 3, num_classes: int = 6, width: int = 12, anti_aliased: bool = False,
                 filter_size: int = 3):
        super().__init__()
        self.anti_aliased = bool(anti_aliased)
        w = int(width)
        self.stem = nn.Sequential(_strided_conv(in_channels, w, 3, anti_aliased, filter_size),
                                  nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = _Block(w, 2 * w, anti_aliased, filter_size)
        self.layer2 = _Block(2 * w, 4 * w, anti_aliased, filter_size)
        self.layer3 = _Block(4 * w, 8 * w, anti_aliased, filter_size)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes)
        # read by the product's preprocessing check (io.models.expected_preprocessing): a job whose
        # data.mean/std differ from these gets a warning
        self.pretrained_cfg = {"architecture": "BenchmarkResNet", "mean": list(MEAN), "std": list(STD)}

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
