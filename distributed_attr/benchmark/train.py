"""Training, evaluation and caching of the benchmark's two models (plain and anti-aliased).

Like the digits zoo (``distributed_attr.zoo``): seeded, on one thread (the order of floating-point
reductions depends on the thread count), but in this process, on the CPU's own instruction-set
paths: the same weights on machines of one CPU kind, not across AVX2 and AVX-512 (the zoo pins
them, ``zoo.training_numerics``). Cached as a ``state_dict`` under ``zoo.cache_dir()``
(``$DISTRIBUTED_ATTR_CACHE`` or ``~/.cache/distributed_attr``), in ``benchmark/``, next to a JSON
record of how it was trained and its held-out accuracy. ``pretrained`` trains only when the cache
has no such file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import generate as gen
from .models import MEAN, STD, BenchmarkResNet

#: model name -> anti-aliased
MODELS = {"benchmark_resnet": False, "benchmark_resnet_aa": True}
#: bump when training changes (the cache key includes it)
TRAIN_VERSION = 1
WIDTH = 12
EPOCHS = 12
BATCH_SIZE = 32
LR = 5e-3
WEIGHT_DECAY = 5e-4
#: fraction of the steps that warm the learning rate up (one-cycle)
PCT_START = 0.15


def build(name: str, num_classes: int = len(gen.CLASSES), width: int = WIDTH) -> BenchmarkResNet:
    """An untrained benchmark model by name."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; valid: {sorted(MODELS)}")
    return BenchmarkResNet(3, num_classes, width=width, anti_aliased=MODELS[name])


def dataset(seed: int = 0, size: int = gen.DEFAULT_SIZE, images: int = gen.DEFAULT_IMAGES,
            data_dir: str | Path | None = None, splits=("train", "validation", "test")) -> dict:
    """``{split: (images uint8 (N, S, S, 3), labels (N,))}``: read from ``data_dir`` when it holds
    this dataset (``benchmark build``), else generated in memory (the same pixels: PNG is lossless)."""
    if data_dir is not None and gen.is_built(data_dir, seed, size, images):
        return {s: gen.load_split(data_dir, s) for s in splits}
    counts = gen.split_counts(images)
    out = {}
    for s in splits:
        exs = list(gen.generate_split(seed, s, counts[s], size))
        out[s] = (np.stack([e.image for e in exs]), np.asarray([e.label for e in exs], np.int64))
    return out


def to_input(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the model's input: float32 (N, 3, H, W), scaled to [0, 1] and
    normalised with ``MEAN``/``STD`` (what a job with the default ``data.mean``/``data.std`` feeds)."""
    t = torch.as_tensor(x).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous(memory_format=torch.channels_last)


def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image flipped / transposed at random (the 8 symmetries of the square). Class shapes
    are drawn at any rotation, so these keep the label."""
    n = x.shape[0]
    flips = torch.randint(0, 2, (3, n), generator=g).bool().view(3, n, 1, 1, 1)
    x = torch.where(flips[0], x.flip(3), x)
    x = torch.where(flips[1], x.flip(2), x)
    return torch.where(flips[2], x.transpose(2, 3), x)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS, seed: int = 0,
          batch_size: int = BATCH_SIZE, lr: float = LR, on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """AdamW on cross-entropy, one-cycle learning rate, random flips; deterministic for a seed.
    ``on_epoch(epoch, mean_loss)`` is called after each epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _train(model, x, y, epochs, seed, batch_size, lr, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(model, x, y, epochs, seed, batch_size, lr, on_epoch):
    torch.manual_seed(seed)
    model.to(memory_format=torch.channels_last)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=PCT_START)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total, count = 0.0, 0
        for start in range(0, len(xt), batch_size):
            idx = perm[start:start + batch_size]
            xb = _dihedral(to_input(xt[idx]), g)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        if on_epoch:
            on_epoch(epoch + 1, total / count)
    return model.eval().to(memory_format=torch.contiguous_format)


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted labels of uint8 images (N, H, W, 3)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model(to_input(x[start:start + batch_size])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x) == y).mean())


def cache_paths(name: str, size: int, seed: int, images: int, epochs: int, width: int = WIDTH) -> tuple[Path, Path]:
    """``(weights, record)`` in ``zoo.cache_dir()/benchmark`` for these settings."""
    from ..zoo import cache_dir

    key = hashlib.sha1(
        f"{name}/{size}/{seed}/{images}/{epochs}/{width}/g{gen.GENERATOR_VERSION}/t{TRAIN_VERSION}".encode()
    ).hexdigest()[:10]
    root = cache_dir() / "benchmark"
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{size}px-{key}"
    return root / f"{stem}.pt", root / f"{stem}.json"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_suffix(f"{path.suffix}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)  # concurrent trainers never see a half-written file


def pretrained(name: str, size: int = gen.DEFAULT_SIZE, seed: int = 0, images: int = gen.DEFAULT_IMAGES,
               epochs: int = EPOCHS, data_dir: str | Path | None = None, data: dict | None = None,
               log: Callable[[str], None] | None = None) -> tuple[nn.Module, Path, dict]:
    """``(model, weights path, record)``: the model (eval mode, CPU) trained on the benchmark's
    training split for ``seed``/``size``/``images``, from the cache, or trained now (minutes on a
    CPU) when the cache has none. The weights load with ``torch.load(path, weights_only=True)``;
    the record (JSON next to them) holds the held-out accuracies.

    ``data``: the splits as ``dataset`` returns them (saves generating them again);
    ``data_dir``: a built benchmark to read them from."""
    path, record_path = cache_paths(name, size, seed, images, epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation, without touching the caller's RNG
        model = build(name)
    if path.exists() and record_path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), path, json.loads(record_path.read_text())
    if data is None:
        data = dataset(seed, size, images, data_dir)
    x_train, y_train = data["train"]
    losses = []

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(round(loss, 5))
        if log:
            log(f"{name}: epoch {epoch}/{epochs} loss {loss:.4f}")

    t0 = time.perf_counter()
    train(model, x_train, y_train, epochs=epochs, seed=seed, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    acc = {s: accuracy(model, *data[s]) for s in ("validation", "test") if s in data}
    record = {
        "name": name,
        "architecture": "BenchmarkResNet",
        "kwargs": {"in_channels": 3, "num_classes": len(gen.CLASSES), "width": WIDTH, "anti_aliased": MODELS[name]},
        "classes": list(gen.CLASSES),
        "mean": list(MEAN),
        "std": list(STD),
        "dataset": gen.manifest_key(seed, size, images),
        "counts": {s: len(v[1]) for s, v in data.items()},
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "pct_start": PCT_START,
        "train_version": TRAIN_VERSION,
        "train_loss": losses,
        "validation_accuracy": acc.get("validation"),
        "test_accuracy": acc.get("test"),
        "train_seconds": round(seconds, 1),
        "threads": 1,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "weights": path.name,
    }
    _atomic_write(path, lambda p: torch.save(model.state_dict(), p))
    _atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return model.eval(), path, record
