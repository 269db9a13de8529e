"""Small classifiers for real data that ships with scikit-learn (handwritten digits).

The demo, the tests and the benchmarks use them so that everything runs offline on a laptop CPU.
Three architectures with different downsampling (strided convolution, max-pooling, a residual
network with strided shortcuts) are trained on the same data: enough for the cross-architecture
feature-detection matrix and for seeing where high-frequency gradient power comes from.

The digits are 8x8 grey levels 0..16; ``digits_dataset`` upsamples them bilinearly to
``size`` x ``size`` and scales them to [0, 1].
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("digits_cnn", "digits_vgg", "digits_resnet")
#: a vision transformer on the same digits, for the attention methods and the spectra of a model
#: that downsamples once, by its patch embedding (kept apart from the CNNs' cross-architecture matrix)
TRANSFORMERS = ("digits_vit",)
NUM_CLASSES = 10
#: training settings that differ from ``train``'s defaults (a transformer needs more epochs)
_TRAINING = {"digits_vit": {"epochs": 30, "lr": 3e-3}}


def digits_dataset(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scikit-learn digits as float32 images (N, 1, size, size) in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.numpy(), d.target.astype(np.int64)


def split_indices(n: int, seed: int = 0, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split of ``n`` items (test first in a seeded permutation)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


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


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 8, seed: int = 0,
          batch_size: int = 64, lr: float = 3e-3) -> nn.Module:
    """Adam on cross-entropy with light shift augmentation; deterministic for a given seed.

    Trains on one thread: the order of floating-point reductions depends on the thread count, so
    two machines (or a test process and the demo) would otherwise train slightly different models
    from the same seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return _train(model, x, y, epochs, seed, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, batch_size: int,
           lr: float) -> nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(xt) + batch_size - 1) // batch_size))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for start in range(0, len(xt), batch_size):
            idx = perm[start:start + batch_size]
            xb = xt[idx]
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def cache_dir() -> Path:
    root = os.environ.get("DISTRIBUTED_ATTR_CACHE") or Path.home() / ".cache" / "distributed_attr"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pretrained(name: str, size: int = 32, epochs: int | None = None, seed: int = 0) -> tuple[nn.Module, Path]:
    """A zoo model trained on the digits' training split, cached on disk as a ``state_dict``.

    Returns the model (eval mode, CPU) and the weights file, which later loads with
    ``torch.load(path, weights_only=True)``. Training takes seconds on a laptop CPU (the
    transformer about two minutes). ``epochs``: the architecture's own default when None."""
    settings = {"epochs": 8, "lr": 3e-3, **_TRAINING.get(name, {})}
    if epochs is not None:
        settings["epochs"] = epochs
    epochs = settings["epochs"]
    key = hashlib.sha1(f"{name}/{size}/{epochs}/{seed}/v4".encode()).hexdigest()[:10]
    path = cache_dir() / f"{name}-{size}px-{key}.pt"
    # Seed the initialisation too (build draws from the global RNG), without touching the caller's RNG.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build(name)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), path
    x, y = digits_dataset(size)
    train_idx, _ = split_indices(len(x))
    train(model, x[train_idx], y[train_idx], epochs=epochs, seed=seed, lr=settings["lr"])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: concurrent trainers never see a half-written file
    return model.eval(), path
