"""The job configuration: one YAML file, or the equivalent Python objects, validated up front.

Every section is a dataclass; unknown keys and bad values raise ``ConfigError`` naming the key path
(``data.format``) and the allowed values before any work starts. The resolved config (defaults
filled in) is stored in the store with its hash, which decides whether a rerun may resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .registry import FieldError, RegistryError, build_params


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key path."""


def _speed(default: Any) -> Any:
    """A run setting that changes how fast a job runs but never what it writes: a resume may
    change it, and it is left out of the config hash."""
    return field(default=default, metadata={"speed": True})


def _reporting(default: Any) -> Any:
    """A run setting that changes what the job says (its warnings) but never the arrays it
    writes: a resume may change it, and it is left out of the config hash (as ``_speed``)."""
    return field(default=default, metadata={"speed": True})


@dataclass
class DataConfig:
    #: parquet (Hugging Face datasets layout), folder (one subfolder per class), webdataset (.tar),
    #: numpy (.npy), or the name of a source another installed package registers (``io.sources``)
    format: str = "parquet"
    #: a file, a directory, or a glob
    path: str = ""
    #: images are resized (shorter side) and centre-cropped to image_size x image_size
    image_size: int = 224
    channels: Literal[1, 3] = 3
    #: per-channel normalisation applied after scaling pixels to [0, 1]
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    image_column: str = "image"
    label_column: str = "label"
    #: Parquet: a column holding each image's ground-truth mask (an image, as the image column:
    #: PNG bytes or {bytes, path}; nonzero = inside), resized and cropped as the image and stored
    #: as ``ground_truth/mask``; localisation metrics need it
    mask_column: str | None = None
    #: numpy format: optional labels file (.npy)
    labels_path: str | None = None
    #: process only the first ``limit`` images
    limit: int | None = None
    #: images whose width x height exceeds this are refused (a per-image failure) before they are
    #: decoded: a few-KB PNG can declare 10^10 pixels (a decompression bomb)
    max_pixels: int = 64_000_000
    #: turn an image as its EXIF orientation tag says (a photo taken with the camera held
    #: sideways), as every viewer shows it; false: use the pixels as stored
    exif_orientation: bool = True
    #: the colour that transparent parts of an image (RGBA, LA, a palette or a PNG with a
    #: transparent colour) are composited on: a grey level or an RGB colour in [0, 1] pixel
    #: values (before mean/std); white by default
    alpha_background: list[float] = field(default_factory=lambda: [1.0])

    def validate(self) -> None:
        from .io.sources import SOURCES  # (the sources import torch: not before a config is read)

        if self.format not in SOURCES:
            raise FieldError("format", f"{self.format!r} is not one of {SOURCES.names()}{SOURCES.plugin_failures()}")
        if not self.path:
            raise ValueError("path is required")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values (channels={self.channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be >= 1")
        if len(self.alpha_background) not in (1, 3) or not all(0 <= v <= 1 for v in self.alpha_background):
            raise ValueError(f"alpha_background must be a grey level or an RGB colour (1 or 3 values) in [0, 1], "
                             f"got {self.alpha_background}")
        if self.mask_column is not None and self.format != "parquet":
            raise ValueError(f"mask_column is read from Parquet data only; format is {self.format!r}")


@dataclass
class ModelConfig:
    #: zoo (bundled digits models), torchvision, torchscript, export (torch.export), callable, timm,
    #: huggingface (an image classifier saved by transformers' save_pretrained); docs/models.md
    kind: Literal["zoo", "torchvision", "torchscript", "export", "callable", "timm", "huggingface"] = "zoo"
    #: architecture name (zoo / torchvision / timm) or "package.module:factory" (callable); a label
    #: only for huggingface (the directory in ``weights`` says everything)
    name: str = "digits_cnn"
    #: weights file, loaded with weights_only=True (or a .safetensors file); for huggingface the
    #: directory written by save_pretrained, local or on object storage. Zoo models train and cache
    #: themselves when omitted.
    weights: str | None = None
    #: classes of the model's head (zoo, torchvision, timm build it so); huggingface: checked
    #: against config.json
    num_classes: int | None = None
    #: keyword arguments of the callable factory, torchvision.models.get_model, timm.create_model,
    #: or from_pretrained (huggingface: only the keys of _HF_KWARGS)
    kwargs: dict = field(default_factory=dict)

    # (not fields) from_pretrained arguments a huggingface config may set; arguments refused with
    # a reason (nothing is downloaded, no code from a model directory runs, heads are never random)
    _HF_KWARGS = {"attn_implementation": "'eager' or 'sdpa'", "variant": "loads model.<variant>.safetensors",
                  "use_safetensors": "true refuses pytorch_model.bin"}
    _REFUSED = {
        "huggingface": {
            "trust_remote_code": "would import and run Python files from the model directory; only architectures "
                                 "built into transformers are loaded (docs/models.md, security)",
            "num_labels": "would replace the classification head by a random one; model.num_classes checks the "
                          "class count",
            "ignore_mismatched_sizes": "would replace weights that do not fit by random ones",
            "weights_only": "is always true",
        },
        "timm": {k: "would load weights past model.weights; timm models are built with pretrained=False and "
                    "their weights come from model.weights" for k in
                 ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")},
    }

    def validate(self) -> None:
        if self.kind in ("torchscript", "export") and not self.weights:
            raise ValueError(f"kind {self.kind!r} needs 'weights': the path of the saved model file")
        if self.kind == "callable" and ":" not in self.name:
            raise ValueError("kind 'callable' needs name 'package.module:factory'")
        for key in self.kwargs:
            if key in self._REFUSED.get(self.kind, {}):
                raise ValueError(f"kwargs.{key} is refused for kind {self.kind!r}: it {self._REFUSED[self.kind][key]}")
            if self.kind == "huggingface" and key not in self._HF_KWARGS:
                allowed = ", ".join(f"{k} ({v})" for k, v in self._HF_KWARGS.items())
                raise ValueError(f"kwargs.{key} is not accepted for kind 'huggingface'; accepted: {allowed}")
        if self.kind == "huggingface" and not self.weights:
            raise ValueError("kind 'huggingface' needs 'weights': the directory written by save_pretrained "
                             "(config.json and the weights), local or on object storage; nothing is downloaded "
                             "from the Hugging Face Hub"
                             + (f" (name {self.name!r} is not fetched)" if "/" in self.name else ""))


@dataclass
class SpectraConfig:
    enabled: bool = True
    #: frequency (cycles per pixel, 0..0.5) above which power counts as high-frequency
    hf_cutoff: float = 0.25

    def validate(self) -> None:
        if not 0 < self.hf_cutoff < 0.5:
            raise ValueError("hf_cutoff must lie in (0, 0.5) cycles per pixel")


@dataclass
class FiltersConfig:
    kind: Literal["forgrad", "ideal", "gaussian", "butterworth"] = "forgrad"
    #: low-pass cutoffs in cycles per image at ``reference_size`` (FORGrad's units); scaled to the image size
    sweep: list[float] = field(default_factory=list)
    reference_size: int = 224
    #: cutoffs of the sweep (same units) whose filtered maps are stored in ``filtered_maps/``
    store_maps: list[float] = field(default_factory=list)
    order: int = 2

    def validate(self) -> None:
        if any(s <= 0 for s in self.sweep):
            raise ValueError("sweep cutoffs must be > 0")
        if self.reference_size < 1:
            raise ValueError("reference_size must be >= 1")
        if self.order < 1:
            raise ValueError("order must be >= 1")
        missing = [s for s in self.store_maps if s not in self.sweep]
        if missing:
            raise ValueError(f"store_maps {missing} are not in the sweep {self.sweep}")


@dataclass
class RunConfig:
    #: images per forward/backward batch inside a worker
    batch_size: int = _speed(32)
    #: images per work unit = one Zarr shard along the image axis; the unit of retry and resume
    unit_size: int = 256
    #: number of actors (model replicas); 0 = in the driver process, without Ray
    num_workers: int = _speed(2)
    #: GPUs per actor; "auto" = 1 when the cluster has GPUs, else 0
    gpus_per_worker: float | Literal["auto"] = _speed("auto")
    #: CPUs per actor (and torch threads per actor on the CPU)
    cpus_per_worker: float = _speed(1)
    seed: int = 0
    #: most samples per internal forward pass (IG steps x images, masks x images, ...)
    max_batch: int = _speed(256)
    autocast: Literal["none", "bfloat16", "float16"] = "none"
    map_dtype: Literal["float16", "float32"] = "float16"
    #: explained class: the model's prediction, the dataset label, or a fixed class index
    target: Literal["prediction", "label"] | int = "prediction"
    #: attempts per unit after actor crashes before the job gives up
    max_retries: int = _speed(3)
    #: calls of units the driver keeps queued at each actor (1 running + waiting), so an actor
    #: never idles between calls
    units_in_flight: int = _speed(2)
    #: threads that decode images inside each actor, overlapped with compute and writing; "auto" =
    #: one per ``cpus_per_worker``; 0 = read, decode, compute and write one after another
    decode_workers: int | Literal["auto"] = _speed("auto")
    #: units an actor reads and decodes ahead of the one it computes (memory: at most
    #: ``prefetch_units + 2`` units held per actor)
    prefetch_units: int = _speed(1)
    #: GPU fast paths. channels_last: NHWC memory layout for model and inputs (faster convolutions
    #: on tensor cores); decode_on_gpu: JPEG payloads decoded by nvJPEG on the actor's GPU
    #: (others on the CPU). Both change maps within float tolerance only (docs/benchmarks-gpu.md).
    channels_last: bool = False
    decode_on_gpu: bool = False
    #: torch.compile the model for the methods that only call it (Saliency, IG, SmoothGrad,
    #: Occlusion, RISE, ...; CAM methods, Guided Backprop and LRP hook its layers and run it
    #: eagerly); a model that does not compile runs eagerly, with the reason logged
    compile: bool = False
    #: number of reference images for methods that need them (Soundness Saliency)
    references: int = 16
    #: seconds the job waits while no actor is alive (all dead, restarting or unschedulable)
    #: before it fails
    actor_timeout: float = _speed(600.0)
    #: seconds the job waits for its actors to be placed and started (an autoscaler adding nodes,
    #: or no node offering what an actor asks for) before it fails, saying what is missing
    placement_timeout: float = _speed(900.0)
    #: seconds a failed object-store request is retried (refused connections, timeouts, server
    #: errors), with exponential backoff, before it fails; a unit whose writes still fail then
    #: goes back to the queue (counted against ``max_retries``). Less than ``lease_seconds``
    storage_retry_seconds: float = _speed(60.0)
    #: life of the store's lease: another driver may take the store over once the driver's last
    #: successful heartbeat is this old; the driver itself stops at 80% of it
    lease_seconds: float = _speed(180.0)
    #: the job warns about a method (on its output and in the store's ``warnings`` attribute)
    #: when more than this fraction of its maps are degenerate: all zero, constant or non-finite
    #: (``degenerate/<method>``); 0 warns about any, 1 never
    degenerate_warn_fraction: float = _reporting(0.05)

    def validate(self) -> None:
        for name in ("batch_size", "unit_size", "max_batch", "units_in_flight", "references"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.decode_workers != "auto" and self.decode_workers < 0:
            raise ValueError("decode_workers must be >= 0 or 'auto'")
        for name in ("num_workers", "max_retries", "cpus_per_worker", "prefetch_units"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.gpus_per_worker != "auto" and self.gpus_per_worker < 0:
            raise ValueError("gpus_per_worker must be >= 0 or 'auto'")
        if not isinstance(self.target, str) and self.target < 0:
            raise ValueError("target must be 'prediction', 'label' or a class index >= 0")
        for name in ("actor_timeout", "placement_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds")
        for name in ("storage_retry_seconds", "lease_seconds"):
            if getattr(self, name) <= 0:
                raise FieldError(name, "must be > 0 seconds")
        if self.storage_retry_seconds >= self.lease_seconds:
            raise FieldError("storage_retry_seconds",
                             f"{self.storage_retry_seconds:g} s must be less than run.lease_seconds "
                             f"({self.lease_seconds:g} s): a request still being retried must not outlive "
                             "the store's lease, or another driver could take the store over meanwhile")
        if not 0 <= self.degenerate_warn_fraction <= 1:
            raise ValueError(f"degenerate_warn_fraction must lie in [0, 1], got {self.degenerate_warn_fraction}")


#: keys that change how fast a job runs but never what it writes: a resume may change them (the
#: run settings declared with ``_speed``)
_RESUMABLE_KEYS = {f"run.{f.name}" for f in dataclasses.fields(RunConfig) if f.metadata.get("speed")}
#: keys that are neither results nor speed: where the store lives (a moved store may be resumed) and
#: how to reach object storage (credentials, endpoints; never recorded unredacted)
_IGNORED_KEYS = {"store", "storage_options"}


def _ignored(key: str) -> bool:
    return key in _RESUMABLE_KEYS or key.split(".", 1)[0] in _IGNORED_KEYS


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (plain PyYAML keeps the last one
    silently, so a duplicated ``methods:`` section would drop the first one's methods)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKeyError(key, line, seen[key])
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first given on line {first})")


@dataclass
class Config:
    data: DataConfig
    store: str
    model: ModelConfig = field(default_factory=ModelConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {"saliency": {}})
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: other models trained on the same data, for the cross-architecture feature-detection metric
    evaluators: dict[str, ModelConfig] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)
    #: object-storage settings (obstore configuration keys, ``client_options``) for every URL of
    #: the job; credentials normally come from the environment instead
    storage_options: dict[str, Any] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
        sections = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - sections)
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {sorted(sections)}")
        for required in ("data", "store"):
            if required not in raw:
                raise ConfigError(f"{required}: required")
        try:
            data = build_params(DataConfig, _mapping(raw["data"], "data"), "data")
            model = build_params(ModelConfig, _mapping(raw.get("model", {}), "model"), "model")
            spectra = build_params(SpectraConfig, _mapping(raw.get("spectra", {}), "spectra"), "spectra")
            filters = build_params(FiltersConfig, _mapping(raw.get("filters", {}), "filters"), "filters")
            run = build_params(RunConfig, _mapping(raw.get("run", {}), "run"), "run")
            evaluators = {
                str(k): build_params(ModelConfig, _mapping(v, f"evaluators.{k}"), f"evaluators.{k}")
                for k, v in _mapping(raw.get("evaluators", {}), "evaluators").items()
            }
        except RegistryError as exc:
            raise ConfigError(str(exc)) from None
        if not isinstance(raw["store"], str) or not raw["store"]:
            raise ConfigError("store: expected the path of the Zarr store, e.g. 'out/attributions.zarr'")
        methods = {str(k): dict(v or {}) for k, v in _mapping(raw.get("methods", {"saliency": {}}), "methods").items()}
        metrics = {str(k): dict(v or {}) for k, v in _mapping(raw.get("metrics", {}), "metrics").items()}
        storage_options = dict(_mapping(raw.get("storage_options", {}), "storage_options"))
        cfg = cls(data=data, store=raw["store"], model=model, methods=methods, spectra=spectra,
                  filters=filters, metrics=metrics, evaluators=evaluators, run=run, storage_options=storage_options)
        cfg.expand_home()
        cfg.check_locations()
        # Store every parameter with its default filled in, so that a default changed between
        # versions shows up in the resume check and the hash instead of silently mixing results.
        cfg.methods, cfg.metrics = cfg.check_registries()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except _DuplicateKeyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        cfg = cls.from_dict(raw or {})
        # Relative paths in a config file are relative to the file, so configs travel with data.
        base = path.resolve().parent
        cfg.data.path = _relative_to(cfg.data.path, base)
        if cfg.data.labels_path:
            cfg.data.labels_path = _relative_to(cfg.data.labels_path, base)
        cfg.store = _relative_to(cfg.store, base)
        for m in [cfg.model, *cfg.evaluators.values()]:
            if m.weights:
                m.weights = _relative_to(m.weights, base)
        return cfg

    def check_registries(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Method and metric names and parameters exist (fails with the valid lists).

        Returns the resolved parameters (every one, defaults filled in) of the methods and of the
        metrics."""
        from .methods import build_method

        if not self.methods:
            raise ConfigError("methods: at least one method is required")
        try:
            methods = {name: dataclasses.asdict(build_method(name, params).params)
                       for name, params in self.methods.items()}
            metrics: dict[str, dict[str, Any]] = {}
            if self.metrics:
                from .metrics.base import build_metric

                metrics = {name: dataclasses.asdict(build_metric(name, params).params)
                           for name, params in self.metrics.items()}
            return methods, metrics
        except RegistryError as exc:
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(("methods.", "metrics.")) else f"methods/metrics: {msg}") from None

    def expand_home(self) -> None:
        """``~`` (or ``~user``) at the start of a local path is the home folder, as a shell would
        expand it (``store: ~/x`` must not make a folder named ``~``). URLs are left alone."""
        self.store = home_expanded(self.store)
        self.data.path = home_expanded(self.data.path)
        self.data.labels_path = home_expanded(self.data.labels_path)
        for m in [self.model, *self.evaluators.values()]:
            m.weights = home_expanded(m.weights)

    def check_locations(self) -> None:
        """Every URL has a known scheme and its optional package is installed (fails now, with the
        install command, rather than in a worker)."""
        from .io.storage import StorageError, check_location

        places = {"store": self.store, "data.path": self.data.path, "data.labels_path": self.data.labels_path,
                  "model.weights": self.model.weights}
        places.update({f"evaluators.{k}.weights": m.weights for k, m in self.evaluators.items()})
        try:
            for what, location in places.items():
                if location:
                    check_location(location, what)
        except StorageError as exc:
            raise ConfigError(str(exc)) from None

    # -- derived -----------------------------------------------------------------------------
    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """The resolved config as plain JSON types; ``redact`` hides secrets in ``storage_options``
        (for anything that is recorded: store attributes, logs)."""
        out = json.loads(json.dumps(dataclasses.asdict(self), default=str))
        if redact:
            from .io.storage import redact as hide

            out["storage_options"] = hide(out.get("storage_options"))
        return out

    def result_hash(self) -> str:
        """Hash of every setting that changes what the job writes (not how fast it runs)."""
        flat = {k: v for k, v in _flatten(self.to_dict()).items() if not _ignored(k)}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]

    def cutoffs(self) -> list[float]:
        """Low-pass cutoffs in cycles per image at this image size; +inf (unfiltered) first."""
        scale = self.data.image_size / self.filters.reference_size
        return [math.inf] + [s * scale for s in self.filters.sweep]


def upgrade_stored_config(stored: dict[str, Any]) -> dict[str, Any]:
    """A resolved config stored by an earlier version, with the method and metric parameters
    renamed since then under their current names (``Params.RENAMED``), so that resuming an old
    store compares like with like. Unknown methods and metrics are left as they are."""
    from .methods import METHODS
    from .metrics import METRICS
    from .registry import rename_params

    out = dict(stored)
    for section, registry in (("methods", METHODS), ("metrics", METRICS)):
        entries = stored.get(section)
        if not isinstance(entries, dict):
            continue
        upgraded = {}
        for name, params in entries.items():
            cls = registry.get(name) if name in registry else None
            try:
                upgraded[name] = rename_params(cls.Params, dict(params or {}), f"{section}.{name}") if cls else params
            except RegistryError:
                upgraded[name] = params  # the diff shows it
        out[section] = upgraded
    return out


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two resolved configs that matter for resuming."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if _ignored(key):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; empty mappings stay as leaves."""
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {value!r}")
    return value


def home_expanded(p: str | None) -> str | None:
    """``os.path.expanduser`` for a path that starts with ``~``; anything else (a URL, a relative or
    absolute path) as it is, and never through ``Path`` (``Path("s3://b/x")`` is ``s3:/b/x``)."""
    return os.path.expanduser(p) if isinstance(p, str) and p.startswith("~") else p


def _relative_to(p: str, base: Path) -> str:
    if not p or "://" in p or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def load_config(source: "str | Path | dict | Config") -> Config:
    if isinstance(source, Config):
        return source
    if isinstance(source, dict):
        return Config.from_dict(source)
    return Config.from_yaml(source)
