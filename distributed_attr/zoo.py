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

from .architectures import (  # noqa: F401  (the zoo's names, as before)
    ARCHITECTURES,
    NUM_CLASSES,
    TRANSFORMERS,
    DigitsCNN,
    DigitsResNet,
    DigitsVGG,
    DigitsViT,
    ResidualBlock,
    build,
)

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
