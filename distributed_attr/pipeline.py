"""What one worker does with one work unit: read, decode, attribute, analyse, write.

``UnitProcessor`` holds a model replica and everything derived from the config; ``process(unit)``
is the whole unit of work. It is plain Python, so the Ray actor (``runner.py``), the in-process
mode (``run.num_workers: 0``) and the tests all run exactly the same code.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .commons import SampleBudget, forward_probabilities
from .config import Config
from .io.models import load_model
from .io.sources import decode_image, decode_sample, open_source
from .io.store import Keys, UnitWriter
from .methods import Context, build_method, compute_maps
from .methods.choices import context_layer
from .methods.degenerate import degenerate_flags

log = logging.getLogger(__name__)

AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class UnitResult:
    unit: int
    images: int
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    #: {array: CRC32C} of the unit's blocks as written (``UnitWriter.write``); the driver records
    #: them at commit (``units/checksum``)
    checksums: dict[str, int] = field(default_factory=dict)


@dataclass
class _LoadedUnit:
    """A unit whose records are read: per image its label and key, and per image that can be
    attributed ``(index, label, name, sample)`` where ``sample`` is a future of the decoded
    ``(image, mask or None)`` (overlapped) or the undecoded ``(payload, mask payload)``
    (sequential)."""

    unit: int
    start: int
    labels: np.ndarray
    keys: list[str]
    t0: float
    items: list[tuple[int, int, str, Any]] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)


class UnitStages:
    """The threads that keep an actor's compute fed: one reader, a pool of decoders, one writer.

    ``held`` counts the units whose data this actor holds (read or decoding, computing, or being
    written); ``max_held`` is its high-water mark, never above ``prefetch_units + 2``."""

    def __init__(self, decode_workers: int, prefetch_units: int, decode_device: torch.device | None = None):
        self.prefetch_units = prefetch_units
        self.decode_device = decode_device
        self.decoders = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="write")
        self.held = 0
        self.max_held = 0
        self._lock = threading.Lock()

    def decode(self, payload: Any, mask: Any, data: Any) -> Future:
        return self.decoders.submit(decode_sample, payload, mask, data, self.decode_device)

    def _hold(self, change: int) -> None:
        with self._lock:
            self.held += change
            self.max_held = max(self.max_held, self.held)

    def run(self, proc: "UnitProcessor", units: list[int]) -> Iterator[UnitResult]:
        ahead: deque[tuple[int, Future]] = deque()  # units being read and decoded, in order
        todo = iter(units)
        writing: tuple[Future, UnitResult] | None = None
        unit = units[0] if units else -1

        def read_next() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                self._hold(+1)
                ahead.append((nxt, self.reader.submit(proc._read, nxt, False)))

        def finish_write() -> UnitResult:
            nonlocal writing, unit
            assert writing is not None
            fut, res = writing
            writing = None
            try:
                res.checksums = fut.result()
            except Exception as exc:
                exc.unit = res.unit  # type: ignore[attr-defined]
                raise
            finally:
                self._hold(-1)
            res.seconds = time.perf_counter() - res.seconds
            return res

        try:
            for _ in range(1 + self.prefetch_units):
                read_next()
            while ahead:
                unit, fut = ahead.popleft()
                try:
                    loaded = fut.result()
                    arrays, failures = proc._compute(loaded)
                except Exception as exc:
                    exc.unit = unit  # type: ignore[attr-defined]
                    if writing is not None:  # the unit before this one is reported first, as in order
                        yield finish_write()
                    raise
                result = UnitResult(unit=unit, images=len(loaded.labels), failures=failures, seconds=loaded.t0)
                del loaded
                # the previous unit's write overlapped this unit's compute; it must end before this
                # one's starts (one unit written at a time)
                if writing is not None:
                    yield finish_write()
                writing = (self.writer.submit(proc._write, unit, arrays), result)
                del arrays
                read_next()
            if writing is not None:
                yield finish_write()
        except BaseException as exc:
            if isinstance(exc, Exception) and not hasattr(exc, "unit"):
                exc.unit = unit  # type: ignore[attr-defined]
            raise
        finally:
            self._drain(ahead, writing)

    def _drain(self, ahead: deque, writing: tuple[Future, UnitResult] | None) -> None:
        """After a failure (or a consumer that stopped early): cancel what was read ahead and let a
        write in progress end, so that no thread of this call outlives it."""
        for _, fut in ahead:
            if not fut.cancel():
                try:
                    loaded = fut.result()
                except Exception:
                    pass
                else:
                    for *_, image in loaded.items:
                        image.cancel()
                    for *_, image in loaded.items:
                        if not image.cancelled():
                            image.exception()
            self._hold(-1)
        ahead.clear()
        if writing is not None:
            writing[0].exception()
            self._hold(-1)
        with self._lock:
            self.held = 0

    def close(self) -> None:
        for pool in (self.reader, self.decoders, self.writer):
            pool.shutdown(wait=True, cancel_futures=True)


def compile_model(model: nn.Module, example: torch.Tensor, autocast: torch.dtype | None
                  ) -> tuple[nn.Module | None, str | None]:
    """``(torch.compile(model), None)``, or ``(None, reason)`` when compiling fails.

    torch.compile compiles lazily, at the first forward and the first backward, so one of each on
    ``example`` (under the job's autocast) runs here: a model that cannot be compiled falls back to
    eager execution at start-up, with the reason logged, instead of failing a unit later."""
    try:
        compiled = torch.compile(model)
        x = example.detach().clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = compiled(x)
        torch.autograd.grad(out.float().sum(), x)
    except Exception as exc:  # any compiler failure: the eager model computes the same maps
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        log.warning("run.compile: torch.compile failed, the model runs eagerly (%s)", reason)
        return None, reason
    return compiled, None


def resolve_decode_workers(setting: int | str, cpus_per_worker: float) -> int:
    """``run.decode_workers``: "auto" = one decode thread per CPU the actor asked for."""
    return max(1, round(cpus_per_worker)) if setting == "auto" else int(setting)


#: fill value and dtype of a unit's array before its batches are written in, by the batch's dtype
#: kind (images that fail keep it): -1 for integers, 0 for unsigned ones (``degenerate/<method>``'s
#: bit flags), False for flags, NaN (float32) otherwise
_FILL = {"i": (-1, np.int64), "u": (0, np.uint8), "b": (False, bool)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_metrics(cfg: Config) -> list[Any]:
    if not cfg.metrics:
        return []
    from .metrics.base import METRICS

    return [METRICS.get(name)(**params) for name, params in cfg.metrics.items()]


def metric_context(cfg: Config, evaluators: dict[str, nn.Module], indices: torch.Tensor | None = None,
                   masks: torch.Tensor | None = None, budget: SampleBudget | None = None):
    """The metrics' context of one batch; ``budget``: the replica's sample budget (a fresh one of
    ``run.max_batch`` when None)."""
    from .metrics.base import MetricContext

    return MetricContext(seed=cfg.run.seed, indices=indices, budget=budget or cfg.run.max_batch,
                         autocast=AUTOCAST[cfg.run.autocast], evaluators=evaluators, masks=masks)


class UnitProcessor:
    """A model replica plus the configured methods, filters and metrics."""

    def __init__(self, cfg: Config, device: torch.device | str | None = None, model: nn.Module | None = None,
                 plan: dict[str, Any] | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else default_device()
        self.model = (model if model is not None else load_model(cfg.model, "model", cfg.storage_options, data=cfg.data)).to(self.device).eval()
        self.methods = [build_method(name, params) for name, params in cfg.methods.items()]
        self.metrics = build_metrics(cfg)
        self.evaluators = {name: load_model(m, f"evaluators.{name}", cfg.storage_options).to(self.device)
                           for name, m in cfg.evaluators.items()}
        #: ``plan``: the driver's listing of the dataset (``Source.plan``), so a worker lists nothing
        self.source = open_source(cfg.data, cfg.storage_options, plan)
        self.cutoffs = cfg.cutoffs()
        #: the dtype ``maps/<method>`` stores (``run.map_dtype``)
        self.map_dtype = getattr(torch, cfg.run.map_dtype)
        # positions in ``self.cutoffs`` (entry 0 is the unfiltered map)
        self.stored_positions = [1 + cfg.filters.sweep.index(s) for s in cfg.filters.store_maps]
        #: the samples one pass may hold on this replica's device, for methods and metrics alike;
        #: an out-of-memory error lowers it for every later batch (the one state batches share)
        self.budget = SampleBudget(cfg.run.max_batch)
        self.ctx = Context(seed=cfg.run.seed, budget=self.budget, autocast=AUTOCAST[cfg.run.autocast])
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        workers = resolve_decode_workers(cfg.run.decode_workers, cfg.run.cpus_per_worker)
        decode_device = self.device if cfg.run.decode_on_gpu and self.device.type == "cuda" else None
        #: the overlapped stages; None = read, decode, compute and write one after another
        self.stages = UnitStages(workers, cfg.run.prefetch_units, decode_device) if workers > 0 else None
        #: the model compiled by torch.compile for the methods that only call it (run.compile);
        #: None when off, or when compiling failed (``compile_error`` says why)
        self.compiled: nn.Module | None = None
        self.compile_error: str | None = None
        if cfg.run.compile and any(m.compile_safe for m in self.methods):
            self.compiled, self.compile_error = compile_model(self.model, self._blank(2), AUTOCAST[cfg.run.autocast])
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
        """(target, prediction, probability of the target) for a batch. The forward pass runs in
        chunks of the sample budget: an out-of-memory error halves the chunk and lowers the budget
        for the methods after it (``commons.forward_probabilities``), as in every other pass."""
        probs = forward_probabilities(self.model, x, self.ctx)
        prediction = probs.argmax(dim=1)
        t = self.cfg.run.target
        if t == "prediction":
            target = prediction
        elif t == "label":
            target = labels.to(self.device)
        else:
            target = torch.full_like(prediction, int(t))
        return target, prediction, probs.gather(1, target.view(-1, 1)).squeeze(1)

    def compute_batch(self, x: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                      masks: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Every per-image array the store holds, for one batch of decoded images (and their
        ground-truth masks (N, H, W) bool, when the data have them). The sample budget an
        out-of-memory error lowered holds for later batches only when this one succeeds."""
        size = self.budget.size
        try:
            return self._compute_batch(x, labels, indices, masks)
        except BaseException:
            self.budget.reset(size)
            raise

    def _compute_batch(self, x: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                       masks: torch.Tensor | None) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if self.device.type == "cuda" and x.device.type == "cpu":
            # from page-locked memory the copy runs asynchronously to the host
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        if cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self._layer_resolved:
            # the layer the driver resolved and recorded (``runner.resolve_method_choices``)
            self.ctx = dataclasses.replace(self.ctx, layer=context_layer(self.model, self.methods, x[:1]))
            self._layer_resolved = True
        target, prediction, probability = self.targets(x, labels)
        # a context of this batch's own (contexts are immutable; they share only the budget)
        ctx = dataclasses.replace(self.ctx, indices=indices, references=self.references())
        if self.compiled is None:
            maps = compute_maps(self.model, x, target, self.methods, ctx)
        else:  # methods that hook or rewrite the model's layers run it eagerly
            maps = compute_maps(self.compiled, x, target, [m for m in self.methods if m.compile_safe], ctx)
            maps.update(compute_maps(self.model, x, target, [m for m in self.methods if not m.compile_safe], ctx))
            maps = {m.name: maps[m.name] for m in self.methods}
        out: dict[str, np.ndarray] = {
            Keys.TARGET: target.cpu().numpy(),
            Keys.PREDICTION: prediction.cpu().numpy(),
            Keys.PROBABILITY: probability.cpu().numpy(),
        }
        if masks is not None:
            out[Keys.GROUND_TRUTH_MASK] = masks.cpu().numpy()
        masks_dev = masks.to(self.device) if masks is not None else None
        mctx = metric_context(cfg, self.evaluators, indices, masks_dev, self.budget) if self.metrics else None
        for name, m in maps.items():
            out[Keys.maps(name)] = m.cpu().numpy()
            # the flags (all zero, constant, non-finite) of the raw map as it is stored: a map
            # under float16's range is stored as zeros, one above it as inf
            out[Keys.degenerate(name)] = degenerate_flags(m.to(self.map_dtype)).cpu().numpy()
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
                per_cutoff = [metric.evaluate(self.model, x, v, target,
                                              self._with_explain(mctx, metric, name, c, ctx))
                              for v, c in zip(variants, self.cutoffs)]
                for output in per_cutoff[0]:
                    out[Keys.metric(metric.name, output, name)] = torch.stack(
                        [r[output].float() for r in per_cutoff], 1).cpu().numpy()
        return out

    def _with_explain(self, mctx: Any, metric: Any, method: str, cutoff: float, ctx: Context) -> Any:
        """The metric context, with ``explain`` for a metric that recomputes maps (robustness):
        the method's maps of other inputs, low-passed at ``cutoff`` as the scored map was."""
        if not metric.needs_explain:
            return mctx
        cfg = self.cfg
        chosen = next(m for m in self.methods if m.name == method)
        model = self.compiled if self.compiled is not None and chosen.compile_safe else self.model

        def explain(x: torch.Tensor, target: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
            # ``indices``: each row's image, so that a sampling method draws that image's noise
            sub = dataclasses.replace(ctx, indices=indices)
            maps = compute_maps(model, x, target, [chosen], sub)[method]
            if cutoff == float("inf"):
                return maps
            from .spectral import low_pass

            return low_pass(maps, cutoff, kind=cfg.filters.kind, order=cfg.filters.order)

        return dataclasses.replace(mctx, explain=explain)

    def spectra(self, maps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Radial spectra (N, cutoffs, F) and high-frequency fractions (N, cutoffs): the raw map at
        cutoff +inf, then the low-passed maps of the sweep, all from one batched FFT pass."""
        from .spectral import high_frequency_fraction_from_spectrum, radial_bin_counts, spectra_by_cutoff

        cfg = self.cfg
        freqs, profile = spectra_by_cutoff(maps, self.cutoffs, kind=cfg.filters.kind, order=cfg.filters.order)
        counts = radial_bin_counts(maps.shape[-2], maps.shape[-1])
        hf = high_frequency_fraction_from_spectrum(freqs, profile, counts, cfg.spectra.hf_cutoff)
        return profile.cpu().numpy(), hf.cpu().numpy()

    # -- the unit of work ------------------------------------------------------------------------
    def process(self, unit: int) -> UnitResult:
        """Attribute one unit and write its block of every array (one call per array)."""
        return list(self.process_units([unit]))[0]

    def process_units(self, units: Sequence[int]) -> Iterator[UnitResult]:
        """Attribute ``units`` in order, yielding each one's result once its shards are written.

        Overlapped (``run.decode_workers`` > 0): a reader thread reads the records of up to
        ``run.prefetch_units`` units ahead and hands each image to a pool of decode threads, the
        calling thread computes batch after batch as soon as their images are decoded, and a writer
        thread writes a finished unit's shards while the next unit computes. At most
        ``prefetch_units + 2`` units are held (reading ahead, computing, writing). Sequential
        (``decode_workers: 0``): read, decode, compute and write one after another in this thread.
        Both give the same arrays, bit for bit: batches are formed from the same images in the same
        order, and decoding is a pure function of the payload.

        A unit fails exactly as before: an image that does not decode is a recorded failure, an
        error in reading, computing or writing raises with ``exc.unit`` naming the unit, and no
        unit after it is written."""
        self.references()  # read before the reader thread shares the source
        if self.stages is None:
            for unit in units:
                try:
                    loaded = self._read(unit, inline=True)
                    arrays, failures = self._compute(loaded)
                    checksums = self._write(unit, arrays)
                except Exception as exc:
                    exc.unit = unit  # type: ignore[attr-defined]  (the caller names the failing unit)
                    raise
                yield UnitResult(unit=unit, images=len(loaded.labels), failures=failures,
                                 seconds=time.perf_counter() - loaded.t0, checksums=checksums)
            return
        yield from self.stages.run(self, list(units))

    def _read(self, unit: int, inline: bool) -> _LoadedUnit:
        """A unit's records, each image either decoded in the background (a future of the decode
        pool) or, ``inline``, left as its payload for the computing thread to decode."""
        t0 = time.perf_counter()
        cfg = self.cfg
        start = unit * cfg.run.unit_size
        stop = min(self.n_images(), start + cfg.run.unit_size)
        loaded = _LoadedUnit(unit=unit, start=start, labels=np.full(stop - start, -1, dtype=np.int64),
                             keys=[""] * (stop - start), t0=t0)
        for rec in self.source.read(start, stop):
            loaded.labels[rec.index - start] = rec.label
            loaded.keys[rec.index - start] = rec.key
            if cfg.run.target == "label" and not 0 <= rec.label < self.num_classes:
                loaded.failures[rec.index] = (
                    f"target is 'label' but the image's label {rec.label} is not a class of the "
                    f"model (0..{self.num_classes - 1})" if rec.label >= 0 else "target is 'label' but the image has no label")
                continue
            sample = (rec.payload, rec.mask) if inline else self.stages.decode(rec.payload, rec.mask, cfg.data)
            loaded.items.append((rec.index, rec.label, rec.name, sample))
        return loaded

    def _compute(self, loaded: _LoadedUnit) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Every array of one unit: batches of ``run.batch_size`` decoded images, in record order."""
        cfg = self.cfg
        n, start = len(loaded.labels), loaded.start
        failures = dict(loaded.failures)
        arrays: dict[str, np.ndarray] = {}
        done_rows: list[int] = []
        batch: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []

        def flush() -> None:
            rows = np.asarray([b[0] for b in batch], dtype=np.int64) - start
            x = torch.stack([b[2] for b in batch])
            masks = torch.stack([b[3] for b in batch]) if cfg.data.mask_column is not None else None
            out = self.compute_batch(x, torch.as_tensor([b[1] for b in batch]), torch.as_tensor(rows + start), masks)
            for key, value in out.items():
                if key not in arrays:
                    arrays[key] = np.full((n, *value.shape[1:]), *_FILL.get(value.dtype.kind, (np.nan, np.float32)))
                arrays[key][rows] = value
            done_rows.extend(rows.tolist())
            batch.clear()

        for index, label, name, sample in loaded.items:
            try:
                img, mask = sample.result() if isinstance(sample, Future) else decode_sample(*sample, cfg.data)
            except Exception as exc:  # a corrupt image (or mask) fails alone; the unit goes on
                failures[index] = f"{type(exc).__name__}: {exc}"[:300] + (f" ({name})" if name else "")
                continue
            batch.append((index, label, img, mask))
            if len(batch) == cfg.run.batch_size:
                flush()
        if batch:
            flush()
        ok = np.zeros(n, dtype=bool)
        ok[done_rows] = True
        arrays.update({Keys.IMAGE: np.arange(start, start + n, dtype=np.int64), Keys.LABEL: loaded.labels,
                       Keys.OK: ok, Keys.SOURCE_KEY: np.asarray(loaded.keys, dtype=str)})
        return arrays, failures

    def _write(self, unit: int, arrays: dict[str, np.ndarray]) -> dict[str, int]:
        """Write the unit's blocks; returns their checksums. A unit none of whose images decoded
        computed only ``image``, ``label``, ``ok`` and ``source_key``: the writer fills its other
        arrays, so that every done unit has every shard."""
        if self._writer is None:
            self._writer = UnitWriter(self.cfg.store, self.cfg.storage_options)
        return self._writer.write(unit, arrays)

    @property
    def num_classes(self) -> int:
        """Classes the model predicts (width of its output), from one forward pass of a blank image."""
        if self._num_classes is None:
            self._num_classes = int(self.probe_output(self._blank(1)).shape[1])
        return self._num_classes

    @num_classes.setter
    def num_classes(self, classes: int) -> None:
        """Set by a caller that already ran the model (the driver's input check), sparing the probe."""
        self._num_classes = int(classes)

    def _blank(self, n: int) -> torch.Tensor:
        size = self.cfg.data.image_size
        return torch.zeros(n, self.cfg.data.channels, size, size, device=self.device)

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
