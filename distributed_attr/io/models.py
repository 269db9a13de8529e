"""Model loading: zoo, torchvision, TorchScript, torch.export, a factory callable, or timm.

Weights are always loaded with ``weights_only=True`` (no arbitrary code from checkpoint files) and
fingerprinted (SHA-256 of the parameters and buffers), so the store records exactly which model
produced its maps.
"""
from __future__ import annotations

import hashlib
import io
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig


class ModelError(ValueError):
    """The model cannot be built or loaded as configured."""


def _weights_file(path: str, where: str, storage_options: dict | None) -> Any:
    """A local path as it is; an object-store URL read into memory (torch loads from file objects)."""
    from .storage import StorageError, is_remote, read_bytes

    if not is_remote(path):
        if not Path(path).exists():
            raise ModelError(f"{where}.weights: file {path!r} does not exist")
        return path
    try:
        return io.BytesIO(read_bytes(path, storage_options))
    except (FileNotFoundError, StorageError) as exc:
        raise ModelError(f"{where}.weights: {exc}") from None


def _load_state_dict(model: nn.Module, path: str, where: str, storage_options: dict | None = None) -> None:
    source = _weights_file(path, where, storage_options)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{where}.weights: cannot load {path!r} with weights_only=True: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{where}.weights: {path!r} does not fit the architecture: {str(exc)[:500]}") from None


def load_model(cfg: ModelConfig, where: str = "model", storage_options: dict | None = None) -> nn.Module:
    """Build the configured model in eval mode on the CPU, parameters frozen."""
    if cfg.kind == "zoo":
        from .. import zoo

        if cfg.name not in zoo.ARCHITECTURES:
            raise ModelError(f"{where}.name: {cfg.name!r} is not a zoo model; valid: {list(zoo.ARCHITECTURES)}")
        if cfg.weights:
            model = zoo.build(cfg.name, num_classes=cfg.num_classes or zoo.NUM_CLASSES)
            _load_state_dict(model, cfg.weights, where, storage_options)
        else:
            model, _ = zoo.pretrained(cfg.name)
    elif cfg.kind == "torchvision":
        import torchvision

        kwargs = dict(cfg.kwargs)
        if cfg.num_classes:
            kwargs["num_classes"] = cfg.num_classes
        try:
            model = torchvision.models.get_model(cfg.name, weights=None, **kwargs)
        except ValueError:
            raise ModelError(
                f"{where}.name: {cfg.name!r} is not a torchvision model; e.g. {torchvision.models.list_models()[:12]}"
            ) from None
        if cfg.weights:
            _load_state_dict(model, cfg.weights, where, storage_options)
    elif cfg.kind == "torchscript":
        try:
            model = torch.jit.load(_weights_file(cfg.weights, where, storage_options), map_location="cpu")
        except Exception as exc:
            raise ModelError(f"{where}.weights: cannot load TorchScript file {cfg.weights!r}: {exc}") from None
    elif cfg.kind == "export":
        try:
            model = torch.export.load(_weights_file(cfg.weights, where, storage_options)).module()
        except Exception as exc:
            raise ModelError(f"{where}.weights: cannot load torch.export file {cfg.weights!r}: {exc}") from None
    elif cfg.kind == "callable":
        module_name, _, attr = cfg.name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"{where}.name: cannot import {cfg.name!r}: {exc}") from None
        model = factory(**cfg.kwargs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"{where}.name: {cfg.name!r} returned {type(model).__name__}, not a torch.nn.Module")
        if cfg.weights:
            _load_state_dict(model, cfg.weights, where, storage_options)
    elif cfg.kind == "timm":
        try:
            import timm
        except ImportError:
            raise ModelError(f"{where}.kind 'timm' needs timm: pip install 'distributed-attr[timm]'") from None
        kwargs = dict(cfg.kwargs)
        if cfg.num_classes:
            kwargs["num_classes"] = cfg.num_classes
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if cfg.weights:
            _load_state_dict(model, cfg.weights, where, storage_options)
    else:  # the config's Literal type makes this unreachable
        raise ModelError(f"{where}.kind: unknown kind {cfg.kind!r}")
    try:
        model.eval()
    except NotImplementedError:
        pass  # torch.export modules keep the mode they were exported in and refuse eval()
    for p in model.parameters():
        p.requires_grad_(False)  # gradients are taken w.r.t. the input only
    return model


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of all parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
