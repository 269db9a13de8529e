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
import json
import os
import platform
import subprocess
import sys
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

#: the weight cache's version, part of every cache key: bumped whenever training changes the
#: weights it produces. v5: training runs in a child process with the instruction set pinned.
CACHE_VERSION = "v5"

#: the numerical environment ``pretrained`` trains in on an x86-64 CPU with AVX2 (nearly every
#: x86 machine since 2015). Seeds and one thread are not enough for the same bits on another
#: machine: PyTorch's vectorised kernels, oneDNN's convolutions and MKL's matrix products each
#: pick their code path (AVX2, AVX-512, AMX) by the CPU they run on, and the paths round
#: differently (digits_cnn's input-gradient HF share 0.735 with AVX-512, 0.719 with AVX2, from the
#: same seed). These variables take effect only before torch is loaded, hence the child process.
PINNED_X86 = {
    "ATEN_CPU_CAPABILITY": "avx2",   # PyTorch's own kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",    # convolutions (oneDNN)
    "MKL_CBWR": "AVX2",              # matrix products (MKL's conditional numerical reproducibility)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
#: on every CPU: one thread (the order of a reduction depends on the thread count)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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

    Trains on one thread with PyTorch's deterministic algorithms (the order of floating-point
    reductions depends on the thread count), restoring both and the caller's RNG afterwards: the
    same bits in every process of one machine. Another machine gives the same bits only if its
    kernels take the same instruction-set paths: ``pretrained`` pins them (``training_numerics``)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng():
            return _train(model, x, y, epochs, seed, batch_size, lr)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
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


#: seconds a zoo model's training (in a child process) may take before it is given up
TRAINING_TIMEOUT = 3600


def cache_dir() -> Path:
    root = os.environ.get("DISTRIBUTED_ATTR_CACHE") or Path.home() / ".cache" / "distributed_attr"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


_TRAINABLE = (*ARCHITECTURES, *TRANSFORMERS)


def training_numerics() -> tuple[str, dict[str, str]]:
    """``(tag, environment)`` that ``pretrained`` trains in: on x86-64 with AVX2 or better, the
    pinned instruction set (tag ``x86-avx2``); elsewhere one thread and the CPU's own paths (tag
    ``<machine>-<capability>``: the same weights on CPUs of that kind). Part of the cache key.

    Checked: on one AMD EPYC (AVX-512), a process limited to AVX2 and one on the AVX-512 paths
    train byte-identical weights (digits_cnn, digits_resnet, digits_vit). Not checked: Intel
    CPUs, and other CPU models of the same instruction set (oneDNN and MKL may still choose their
    blocking by cache size)."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and cap in ("avx2", "avx512"):
        return "x86-avx2", {**PINNED_X86, **ONE_THREAD}
    return f"{machine}-{cap}", dict(ONE_THREAD)


def cache_key(name: str, size: int, epochs: int, seed: int) -> str:
    """The cache file's key: the training settings, the numerics, the PyTorch version (its
    kernels' rounding changes between versions) and ``CACHE_VERSION``."""
    tag, _ = training_numerics()
    text = f"{name}/{size}/{epochs}/{seed}/{tag}/torch-{torch.__version__}/{CACHE_VERSION}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def pretrained(name: str, size: int = 32, epochs: int | None = None, seed: int = 0) -> tuple[nn.Module, Path]:
    """A zoo model trained on the digits' training split, cached on disk as a ``state_dict``.

    Returns the model (eval mode, CPU) and the weights file, which later loads with
    ``torch.load(path, weights_only=True)``. Training takes seconds on a laptop CPU (the
    transformer about three minutes). ``epochs``: the architecture's own default when None.
    Training runs in a child process in the environment ``training_numerics`` gives, so that the
    weights are the same bits on every machine of one kind, whatever this process's threads."""
    if name not in _TRAINABLE:
        build(name)  # the unknown-name error, before any child process
    settings = {"epochs": 8, "lr": 3e-3, **_TRAINING.get(name, {})}
    if epochs is not None:
        settings["epochs"] = epochs
    epochs = settings["epochs"]
    path = cache_dir() / f"{name}-{size}px-{cache_key(name, size, epochs, seed)}.pt"
    if not path.exists():
        _train_in_child(path, name=name, size=size, epochs=epochs, seed=seed, lr=settings["lr"])
    with torch.random.fork_rng():  # build draws from the global RNG: the caller's is left as it was
        model = build(name)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), path


def _train_in_child(path: Path, **settings) -> None:
    _, env = training_numerics()
    package_root = str(Path(__file__).resolve().parents[1])  # this copy of the package, not another
    child_env = {**os.environ, **env,
                 "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    code = "import sys, json; from distributed_attr.zoo import _train_to_file; _train_to_file(**json.loads(sys.argv[1]))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps({"path": str(path), **settings})],
                              env=child_env, capture_output=True, text=True, timeout=TRAINING_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"training zoo model {settings['name']!r} did not finish in {TRAINING_TIMEOUT} s "
                           "(the transformer takes about 2 minutes on a 2-core CPU)") from None
    if proc.returncode != 0 or not path.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"training zoo model {settings['name']!r} failed (exit {proc.returncode}): {tail}")


def _train_to_file(path: str, name: str, size: int, epochs: int, seed: int, lr: float) -> None:
    """The child's work: seeded initialisation, training, an atomic write of the ``state_dict``."""
    # build draws its initialisation from the global RNG: seeded here, in this process of its own
    torch.manual_seed(seed)
    model = build(name)
    x, y = digits_dataset(size)
    train_idx, _ = split_indices(len(x))
    train(model, x[train_idx], y[train_idx], epochs=epochs, seed=seed, lr=lr)
    dest = Path(path)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, dest)  # atomic: concurrent trainers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)  # a write that failed leaves nothing in the cache
