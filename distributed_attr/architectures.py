"""The bundled classifiers' architectures: three CNNs with different downsampling (strided
convolution, max-pooling, a residual network with strided shortcuts) and a small vision
transformer, sized for 32 x 32 digits. Pure ``nn.Module`` definitions: the data, training and the
weight cache are ``zoo``'s."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("digits_cnn", "digits_vgg", "digits_resnet")
#: a vision transformer on the same digits, for the attention methods and the spectra of a model
#: that downsamples once, by its patch embedding (kept apart from the CNNs' cross-architecture matrix)
TRANSFORMERS = ("digits_vit",)
NUM_CLASSES = 10


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """Strided convolutions downsample (the aliasing-prone design)."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), *_conv_bn(width, width, stride=2),
            *_conv_bn(width, 2 * width), *_conv_bn(2 * width, 2 * width, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DigitsVGG(nn.Module):
    """Max-pooling downsamples."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (1x1 convolution when the shape
    changes), as in torchvision's BasicBlock. Public because LRP's canonizer recognises it
    (``methods.lrp.resolve_canonizer``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small residual network; strided 3x3 and 1x1 convolutions downsample."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = ResidualBlock(width, width, 1)
        self.layer2 = ResidualBlock(width, 2 * width, 2)
        self.layer3 = ResidualBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsViT(nn.Module):
    """torchvision's ``VisionTransformer`` at digit size: 4 x 4 patches (an 8 x 8 token grid plus
    the class token), 3 encoder blocks of width 64 with 4 heads; its patch embedding takes
    ``in_channels`` channels. Torchvision's own module, so that every library that knows
    torchvision ViTs (our CAM token mapping, attention methods) reads it as such."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES):
        super().__init__()
        from torchvision.models import VisionTransformer

        self.vit = VisionTransformer(image_size=32, patch_size=4, num_layers=3, num_heads=4, hidden_dim=64,
                                     mlp_dim=128, num_classes=num_classes)
        self.vit.conv_proj = nn.Conv2d(in_channels, 64, kernel_size=4, stride=4)

    def forward(self, x):
        return self.vit(x)


_CLASSES = {"digits_cnn": DigitsCNN, "digits_vgg": DigitsVGG, "digits_resnet": DigitsResNet, "digits_vit": DigitsViT}


def build(name: str, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> nn.Module:
    """An untrained zoo architecture by name."""
    if name not in _CLASSES:
        raise ValueError(f"unknown zoo architecture {name!r}; valid: {sorted(_CLASSES)}")
    return _CLASSES[name](in_channels=in_channels, num_classes=num_classes)
