"""Model loading: zoo, torchvision, TorchScript, torch.export, a factory callable, timm, or a
Hugging Face image classifier saved in a directory.

Weights are always loaded with ``weights_only=True`` or from safetensors files (no arbitrary code
from checkpoint files), nothing is downloaded, and every model is fingerprinted (SHA-256 of the
parameters and buffers), so the store records exactly which model produced its maps.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """The model cannot be built or loaded as configured."""


# --------------------------------------------------------------------------------------------
# Weights files (state dicts and safetensors)
# --------------------------------------------------------------------------------------------


def _weights_file(path: str, where: str, storage_options: dict | None) -> Any:
    """A local path as it is; an object-store URL read into memory (torch loads from file objects)."""
    from .storage import StorageError, is_remote, local_path, read_bytes

    if not is_remote(path):
        if not Path(local_path(path)).exists():
            raise ModelError(f"{where}.weights: file {path!r} does not exist")
        return local_path(path)
    try:
        return io.BytesIO(read_bytes(path, storage_options))
    except (FileNotFoundError, StorageError) as exc:
        raise ModelError(f"{where}.weights: {exc}") from None


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with the length of its JSON header (8 bytes, little-endian),
    then the header's ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


def _read_state_dict(path: str, where: str, storage_options: dict | None) -> Any:
    """The tensors of a weights file: safetensors (by extension or content) or a ``torch.save``
    file loaded with ``weights_only=True``."""
    source = _weights_file(path, where, storage_options)
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:9]
    else:
        with open(source, "rb") as fh:
            head = fh.read(9)
    if str(path).endswith(".safetensors") or _looks_like_safetensors(head):
        try:
            from safetensors.torch import load, load_file
        except ImportError:
            raise ModelError(f"{where}.weights: {path!r} is a safetensors file, which needs the safetensors "
                             "package: pip install safetensors") from None
        try:
            return load(source.getvalue()) if isinstance(source, io.BytesIO) else load_file(source, device="cpu")
        except Exception as exc:
            raise ModelError(f"{where}.weights: cannot read safetensors file {path!r}: {exc}") from None
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{where}.weights: cannot load {path!r} with weights_only=True: {exc}") from None


def _load_state_dict(model: nn.Module, path: str, where: str, storage_options: dict | None = None) -> None:
    state = _read_state_dict(path, where, storage_options)
    # training checkpoints that wrap the state dict: {"state_dict": ...}, {"model": ...} (DeiT)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{where}.weights: {path!r} does not fit the architecture: {str(exc)[:500]}") from None


# --------------------------------------------------------------------------------------------
# Hugging Face image classifiers
# --------------------------------------------------------------------------------------------


class LogitsOf(nn.Module):
    """A model whose forward returns a Hugging Face ``ModelOutput`` (or a tuple), made into one
    that returns the logits tensor (N, classes), as the methods and metrics expect.

    The wrapped model is the submodule ``model``, so its layers keep readable names:
    ``model.<name inside the wrapped model>`` (``model.vit.layers.11.layernorm_before``).
    ``get_submodule`` also accepts the wrapped model's own names without the prefix
    (``vit.layers.11.layernorm_before``, as ``named_modules()`` of the Hugging Face model lists
    them), so a CAM ``layer`` may be written either way.

    ``preprocessing``: what the model expects (``mean``, ``std``, ``image_size``, ``source``),
    from its ``preprocessor_config.json``, or None."""

    def __init__(self, model: nn.Module, preprocessing: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, Tensor):
            logits = out
        if logits is None and isinstance(out, (tuple, list)) and out:
            logits = out[0]
        if not isinstance(logits, Tensor):
            raise TypeError(f"{type(self.model).__name__} returned {type(out).__name__} without logits")
        return logits

    def get_submodule(self, target: str) -> nn.Module:
        try:
            return super().get_submodule(target)
        except AttributeError:
            if not target or target == "model" or target.startswith("model."):
                raise
            return self.model.get_submodule(target)


#: files of a model directory copied from object storage
_HF_FILES = re.compile(r".*\.json|.*\.safetensors|pytorch_model(-\d+-of-\d+)?(\.[\w-]+)?\.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_hint(location: str) -> str:
    hint = ("kind 'huggingface' loads a local directory written by save_pretrained (config.json and the "
            "weights), or such a directory on object storage; nothing is downloaded from the Hub")
    if _HUB_ID.match(location):
        hint = (f"{location!r} looks like a Hugging Face Hub id: download it first "
                f"(hf download {location} --local-dir DIR) and set model.weights: DIR. " + hint)
    return hint


@contextlib.contextmanager
def _model_directory(location: str, where: str, storage_options: dict | None) -> Iterator[Path]:
    """The local directory of the model: the path itself, or a temporary copy of an object-store
    prefix (its config, json files and weights files; removed after loading)."""
    from .storage import StorageError, filesystem, is_remote, local_path

    if not is_remote(location):
        path = Path(local_path(location))
        if not path.exists():
            raise ModelError(f"{where}.weights: directory {location!r} does not exist. {_hub_hint(location)}")
        if not path.is_dir():
            raise ModelError(f"{where}.weights: {location!r} is a file; kind 'huggingface' needs the directory "
                             "written by save_pretrained (config.json and the weights)")
        yield path
        return
    try:
        fs, prefix = filesystem(location, storage_options)
        entries = fs.ls(prefix, detail=True)
    except FileNotFoundError:
        entries = []
    except StorageError as exc:
        raise ModelError(f"{where}.weights: {exc}") from None
    except Exception as exc:
        raise ModelError(f"{where}.weights: cannot list {location!r}: {type(exc).__name__}: {exc}") from None
    names = [posix_name for e in entries if e.get("type") == "file"
             and _HF_FILES.fullmatch(posix_name := str(e["name"]).rstrip("/").rsplit("/", 1)[-1])]
    if not names:
        raise ModelError(f"{where}.weights: no model files under {location!r} (expected config.json and "
                         "*.safetensors, as save_pretrained writes them)")
    with tempfile.TemporaryDirectory(prefix="distributed_attr-hf-", ignore_cleanup_errors=True) as tmp:
        for name in names:
            try:
                data = fs.cat_file(f"{prefix}/{name}")
            except Exception as exc:
                raise ModelError(f"{where}.weights: cannot read {location.rstrip('/')}/{name}: "
                                 f"{type(exc).__name__}: {exc}") from None
            (Path(tmp) / name).write_bytes(data)
        yield Path(tmp)


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}.weights: cannot read {path.name}: {exc}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{where}.weights: {path.name} is not a JSON object")
    return value


def hf_preprocessing(directory: Path, where: str = "model") -> dict[str, Any] | None:
    """What a Hugging Face model expects, from its ``preprocessor_config.json``: ``mean``, ``std``
    (identity when ``do_normalize`` is false) and ``image_size`` (the crop, else the resize)."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        cfg = _read_json(path, where)
    except ModelError as exc:
        log.warning("%s; the data's normalisation is not checked against it", exc)
        return None
    out: dict[str, Any] = {"source": "preprocessor_config.json"}
    if cfg.get("do_normalize", True):
        if isinstance(cfg.get("image_mean"), (list, float, int)):
            out["mean"] = cfg["image_mean"]
        if isinstance(cfg.get("image_std"), (list, float, int)):
            out["std"] = cfg["image_std"]
    else:
        out["mean"], out["std"] = [0.0], [1.0]
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
    if isinstance(size, int):
        out["image_size"] = size
    elif isinstance(size, dict):
        side = size.get("height", size.get("shortest_edge"))
        if isinstance(side, int) and size.get("width", side) == side:
            out["image_size"] = side
    return out


def _load_huggingface(cfg: ModelConfig, where: str, storage_options: dict | None) -> nn.Module:
    try:
        import transformers
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ModelError(f"{where}.kind 'huggingface' needs transformers: "
                         "pip install 'distributed-attr[huggingface]'") from None
    location = cfg.weights
    with _model_directory(location, where, storage_options) as directory:
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ModelError(f"{where}.weights: no config.json in {location!r}; kind 'huggingface' needs a "
                             "directory written by save_pretrained (config.json and the weights)")
        config = _read_json(config_path, where)
        if config.get("auto_map"):
            raise ModelError(f"{where}.weights: the model in {location!r} needs its own Python code (config.json "
                             "has 'auto_map'); running code from a model directory (trust_remote_code) is refused")
        archs = config.get("architectures") or []
        if archs and not any("ForImageClassification" in str(a) for a in archs):
            raise ModelError(f"{where}.weights: {location!r} holds a {', '.join(map(str, archs))}, not an "
                             "image-classification model (…ForImageClassification, with its classification head)")
        preprocessing = hf_preprocessing(directory, where)
        progress = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            model, info = AutoModelForImageClassification.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False, weights_only=True,
                output_loading_info=True, **cfg.kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc) or "Unrecognized model" in str(exc):
                raise ModelError(f"{where}.weights: {location!r} is not an image-classification model "
                                 f"(model_type {config.get('model_type')!r} has no "
                                 "AutoModelForImageClassification class in this transformers version)") from None
            raise ModelError(f"{where}.weights: cannot load {location!r}: {exc}") from None
        except Exception as exc:
            raise ModelError(f"{where}.weights: cannot load {location!r}: {type(exc).__name__}: {exc}") from None
        finally:
            if progress:
                transformers.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        raise ModelError(f"{where}.weights: {location!r} lacks weights for {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}; they would be random (a model saved without "
                         "its classification head?)")
    n_labels = int(getattr(model.config, "num_labels", 0) or 0)
    if cfg.num_classes and n_labels and cfg.num_classes != n_labels:
        raise ModelError(f"{where}.num_classes: {cfg.num_classes}, but the model in {location!r} has "
                         f"{n_labels} classes (config.json)")
    if preprocessing is not None:
        preprocessing["source"] = f"{preprocessing['source']} in {location}"
    return LogitsOf(model, preprocessing)


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------

def _load_timm(cfg: ModelConfig, where: str, storage_options: dict | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError(f"{where}.kind 'timm' needs timm: pip install 'distributed-attr[timm]'") from None
    kwargs = dict(cfg.kwargs)
    if cfg.num_classes:
        kwargs["num_classes"] = cfg.num_classes
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"{cfg.name.split('_')[0].split('.')[0]}*")[:12]
        raise ModelError(f"{where}.name: {cfg.name!r} is not a timm model"
                         + (f"; similar: {close}" if close else "; see timm.list_models()"))
    try:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ModelError(f"{where}: timm cannot build {cfg.name!r} with kwargs {kwargs}: "
                         f"{type(exc).__name__}: {exc}") from None
    if cfg.weights:
        _load_state_dict(model, cfg.weights, where, storage_options)
    return model


# --------------------------------------------------------------------------------------------
# What the model expects of its inputs
# --------------------------------------------------------------------------------------------


def expected_preprocessing(model: nn.Module) -> dict[str, Any] | None:
    """``{"mean", "std", "image_size", "source"}`` (any may be missing) the model was trained
    with, when the model says: a Hugging Face ``preprocessor_config.json``, timm's
    ``pretrained_cfg``. None otherwise."""
    if isinstance(model, LogitsOf):
        return model.preprocessing
    pcfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(pcfg, dict) or "mean" not in pcfg:
        return None
    out: dict[str, Any] = {"mean": list(pcfg["mean"]), "std": list(pcfg.get("std") or [1.0]),
                           "source": f"timm's pretrained_cfg of {pcfg.get('architecture', type(model).__name__)!r}"}
    # a model built for a fixed size (ViT/DeiT/Swin patch embedding) says so; else the cfg's
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = fixed if fixed is not None else (pcfg.get("input_size") or [None])[-1]
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else None
    if isinstance(size, int):
        out["image_size"] = size
    return out


def _differs(configured: list[float], expected: Any) -> bool:
    expected = [float(v) for v in (expected if isinstance(expected, (list, tuple)) else [expected])]
    n = max(len(configured), len(expected))
    if len(configured) not in (1, n) or len(expected) not in (1, n):
        return True
    a = configured * (n // len(configured))
    b = expected * (n // len(expected))
    return any(not math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a, b))


def check_preprocessing(model: nn.Module, data: Any, where: str = "model") -> list[str]:
    """Compare ``data.mean``/``data.std``/``data.image_size`` with what the model expects
    (``expected_preprocessing``); log a warning per difference and return the messages. The data
    config is never changed: the maps are computed on inputs normalised as configured."""
    expected = expected_preprocessing(model)
    if not expected:
        return []
    src = expected.get("source", "the model")
    notes = []
    for key in ("mean", "std"):
        if key in expected and _differs([float(v) for v in getattr(data, key)], expected[key]):
            notes.append(f"{where}: data.{key} {list(getattr(data, key))} differs from the {key} the model expects, "
                         f"{list(expected[key]) if isinstance(expected[key], (list, tuple)) else expected[key]} "
                         f"({src}); inputs are normalised as configured")
    size = expected.get("image_size")
    if isinstance(size, int) and size != data.image_size:
        notes.append(f"{where}: data.image_size {data.image_size} differs from the model's input size {size} ({src})")
    for note in notes:
        log.warning(note)
    return notes


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def load_model(cfg: ModelConfig, where: str = "model", storage_options: dict | None = None,
               data: Any = None) -> nn.Module:
    """Build the configured model in eval mode on the CPU, parameters frozen.

    ``data``: the job's ``DataConfig``; when given, its normalisation and image size are checked
    against what the model expects (``check_preprocessing``: warnings only)."""
    try:
        cfg.validate()
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    # An architecture built without weights starts from random values. Seeded, they are the same in
    # the driver and in every actor, so the stored fingerprint describes the model that made the maps.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(cfg, where, storage_options)
    if not cfg.weights and cfg.kind in ("torchvision", "timm"):
        log.warning("%s: %s %r has no weights: random initialisation (seeded, the same in every process)",
                    where, cfg.kind, cfg.name)
    try:
        model.eval()
    except NotImplementedError:
        pass  # torch.export modules keep the mode they were exported in and refuse eval()
    for p in model.parameters():
        p.requires_grad_(False)  # gradients are taken w.r.t. the input only
    if data is not None:
        check_preprocessing(model, data, where)
    return model


def _build(cfg: ModelConfig, where: str, storage_options: dict | None) -> nn.Module:
    if cfg.kind == "zoo":
        from .. import zoo

        known = (*zoo.ARCHITECTURES, *zoo.TRANSFORMERS)
        if cfg.name not in known:
            raise ModelError(f"{where}.name: {cfg.name!r} is not a zoo model; valid: {list(known)}")
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
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{where}.weights: cannot load TorchScript file {cfg.weights!r}: {exc}") from None
    elif cfg.kind == "export":
        try:
            model = torch.export.load(_weights_file(cfg.weights, where, storage_options)).module()
        except ModelError:
            raise
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
        model = _load_timm(cfg, where, storage_options)
    elif cfg.kind == "huggingface":
        model = _load_huggingface(cfg, where, storage_options)
    else:  # the config's Literal type makes this unreachable
        raise ModelError(f"{where}.kind: unknown kind {cfg.kind!r}")
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
