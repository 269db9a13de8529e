"""What one worker does with one work unit: read, decode, attribute, analyse, write.

``UnitProcessor`` holds a model replica and everything derived from the config; ``process(unit)``
is the whole unit of work. It is plain Python, so the Ray actor (``runner.py``), the in-process
mode (``run.num_workers: 0``) and the tests all run exactly the same code.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Config
from .io.models import load_model
from .io.sources import decode_image, open_source
from .io.store import Keys, UnitWriter
from .methods import Context, build_method, compute_maps, resolve_layer

AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class UnitResult:
    unit: int
    images: int
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_metrics(cfg: Config) -> list[Any]:
    if not cfg.metrics:
        return []
    from .metrics.base import METRICS

    return [METRICS.get(name)(**params) for name, params in cfg.metrics.items()]


def metric_context(cfg: Config, evaluators: dict[str, nn.Module], indices: torch.Tensor | None = None):
    from .metrics.base import MetricContext

    return MetricContext(seed=cfg.run.seed, indices=indices, max_batch=cfg.run.max_batch,
                         autocast=AUTOCAST[cfg.run.autocast], evaluators=evaluators)


class UnitProcessor:
    """A model replica plus the configured methods, filters and metrics."""

    def __init__(self, cfg: Config, device: torch.device | str | None = None, model: nn.Module | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else default_device()
        self.model = (model if model is not None else load_model(cfg.model, "model", cfg.storage_options)).to(self.device).eval()
        self.methods = [build_method(name, params) for name, params in cfg.methods.items()]
        self.metrics = build_metrics(cfg)
        self.evaluators = {name: load_model(m, f"evaluators.{name}", cfg.storage_options).to(self.device)
                           for name, m in cfg.evaluators.items()}
        self.source = open_source(cfg.data, cfg.storage_options)
        self.cutoffs = cfg.cutoffs()
        # positions in ``self.cutoffs`` (entry 0 is the unfiltered map)
        self.stored_positions = [1 + cfg.filters.sweep.index(s) for s in cfg.filters.store_maps]
        self.ctx = Context(seed=cfg.run.seed, max_batch=cfg.run.max_batch, autocast=AUTOCAST[cfg.run.autocast])
        self._layer_resolved = not any(m.needs_layer for m in self.methods)
        self._references: torch.Tensor | None = None
        self._writer: UnitWriter | None = None
        self._num_classes: int | None = None

    # -- pieces ----------------------------------------------------------------------------------
    def references(self) -> torch.Tensor | None:
        """The first ``run.references`` decodable images of the dataset, for methods that need
        natural reference images; the same on every worker."""
        if not any(getattr(m, "needs_references", False) for m in self.methods):
            return None
        if self._references is None:
            refs = []
            for rec in self.source.read(0, min(len(self.source), 4 * self.cfg.run.references)):
                try:
                    refs.append(decode_image(rec.payload, self.cfg.data))
                except Exception:
                    continue
                if len(refs) == self.cfg.run.references:
                    break
            self._references = torch.stack(refs).to(self.device) if refs else None
        return self._references

    def targets(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target, prediction, probability of the target) for a batch."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.ctx.autocast or torch.float32,
                                             enabled=self.ctx.autocast is not None):
            probs = torch.softmax(self.model(x).float(), dim=1)
        prediction = probs.argmax(dim=1)
        t = self.cfg.run.target
        if t == "prediction":
            target = prediction
        elif t == "label":
            target = labels.to(self.device)
        else:
            target = torch.full_like(prediction, int(t))
        return target, prediction, probs.gather(1, target.view(-1, 1)).squeeze(1)

    def compute_batch(self, x: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, np.ndarray]:
        """Every per-image array the store holds, for one batch of decoded images."""
        cfg = self.cfg
        x = x.to(self.device)
        if not self._layer_resolved:
            name = next((m.params.layer for m in self.methods if getattr(m.params, "layer", None)), None)
            self.ctx = dataclasses.replace(self.ctx, layer=resolve_layer(self.model, name, x[:1]))
            self._layer_resolved = True
        target, prediction, probability = self.targets(x, labels)
        # a context of this batch's own: nothing of one batch leaks into the next ...
        ctx = dataclasses.replace(self.ctx, indices=indices, references=self.references())
        maps = compute_maps(self.model, x, target, self.methods, ctx)
        # ... except the sample budget an out-of-memory error taught run_in_chunks
        self.ctx.max_batch = ctx.max_batch
        out: dict[str, np.ndarray] = {
            "target": target.cpu().numpy(),
            "prediction": prediction.cpu().numpy(),
            "probability": probability.cpu().numpy(),
        }
        mctx = metric_context(cfg, self.evaluators, indices) if self.metrics else None
        for name, m in maps.items():
            out[Keys.maps(name)] = m.cpu().numpy()
            if cfg.spectra.enabled:
                out[Keys.spectra(name)], out[Keys.hf_fraction(name)] = self.spectra(m)
            if not (self.metrics or self.stored_positions):
                continue
            from .spectral import low_pass

            # entry 0 is the raw map (the method's own output, FORGrad's "before" point)
            variants = [m if c == float("inf") else low_pass(m, c, kind=cfg.filters.kind, order=cfg.filters.order)
                        for c in self.cutoffs]
            if self.stored_positions:
                out[Keys.filtered_maps(name)] = torch.stack([variants[i] for i in self.stored_positions], 1).cpu().numpy()
            for metric in self.metrics:
                per_cutoff = [metric.evaluate(self.model, x, v, target, mctx) for v in variants]
                for output in per_cutoff[0]:
                    out[Keys.metric(metric.name, output, name)] = torch.stack(
                        [r[output].float() for r in per_cutoff], 1).cpu().numpy()
        return out

    def spectra(self, maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Radial spectra (N, cutoffs, F) and high-frequency fractions (N, cutoffs): the raw map at
        cutoff +inf, then the low-passed maps of the sweep, all from one batched FFT pass."""
        from .spectral import cutoff_sweep_spectra, high_frequency_fraction_from_spectrum, radial_bin_counts
        from .spectral import radial_spectrum

        cfg = self.cfg
        freqs, raw = radial_spectrum(maps)
        parts = [raw[:, None]]
        if len(self.cutoffs) > 1:
            parts.append(cutoff_sweep_spectra(maps, self.cutoffs[1:], kind=cfg.filters.kind, order=cfg.filters.order)[1])
        profile = torch.cat(parts, 1)
        counts = radial_bin_counts(maps.shape[-2], maps.shape[-1])
        hf = high_frequency_fraction_from_spectrum(freqs, profile, counts, cfg.spectra.hf_cutoff)
        return profile.cpu().numpy(), hf.cpu().numpy()

    # -- the unit of work ------------------------------------------------------------------------
    def process(self, unit: int) -> UnitResult:
        """Attribute one unit and write its block of every array (one call per array)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        start = unit * cfg.run.unit_size
        stop = min(self.n_images(), start + cfg.run.unit_size)
        n = stop - start
        failures: dict[int, str] = {}
        images, labels, rows = [], [], []
        all_labels = np.full(n, -1, dtype=np.int64)
        keys = [""] * n
        for rec in self.source.read(start, stop):
            all_labels[rec.index - start] = rec.label
            keys[rec.index - start] = rec.key
            if cfg.run.target == "label" and not 0 <= rec.label < self.num_classes:
                failures[rec.index] = (f"target is 'label' but the image's label {rec.label} is not a class of the "
                                       f"model (0..{self.num_classes - 1})" if rec.label >= 0
                                       else "target is 'label' but the image has no label")
                continue
            try:
                images.append(decode_image(rec.payload, cfg.data))
            except Exception as exc:  # a corrupt image fails alone; the unit goes on
                failures[rec.index] = f"{type(exc).__name__}: {exc}"[:300] + (f" ({rec.name})" if rec.name else "")
                continue
            labels.append(rec.label)
            rows.append(rec.index - start)
        arrays: dict[str, np.ndarray] = {}
        rows_t = np.asarray(rows, dtype=np.int64)
        bs = cfg.run.batch_size
        for b in range(0, len(images), bs):
            x = torch.stack(images[b:b + bs])
            idx = torch.as_tensor(rows_t[b:b + bs] + start)
            batch = self.compute_batch(x, torch.as_tensor(labels[b:b + bs]), idx)
            for key, value in batch.items():
                if key not in arrays:
                    arrays[key] = np.full((n, *value.shape[1:]), -1 if value.dtype.kind in "iu" else np.nan,
                                          dtype=value.dtype if value.dtype.kind in "iu" else np.float32)
                arrays[key][rows_t[b:b + bs]] = value
        ok = np.zeros(n, dtype=bool)
        ok[rows_t] = True
        arrays.update(image=np.arange(start, stop, dtype=np.int64), label=all_labels, ok=ok,
                      source_key=np.asarray(keys, dtype=str))
        if self._writer is None:
            self._writer = UnitWriter(cfg.store, cfg.storage_options)
        self._writer.write(unit, arrays)
        return UnitResult(unit=unit, images=n, failures=failures, seconds=time.perf_counter() - t0)

    @property
    def num_classes(self) -> int:
        """Classes the model predicts (width of its output), from one forward pass of a blank image."""
        if self._num_classes is None:
            self._num_classes = int(self.probe_output(torch.zeros(1, self.cfg.data.channels, self.cfg.data.image_size,
                                                                  self.cfg.data.image_size)).shape[1])
        return self._num_classes

    def probe_output(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for ``x``; raises ``ValueError`` when it is not (N, classes)."""
        with torch.no_grad():
            out = self.model(x.to(self.device))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the model must return class scores of shape (N, classes); got {shape}")
        return out

    def n_images(self) -> int:
        n = len(self.source)
        return min(n, self.cfg.data.limit) if self.cfg.data.limit else n
