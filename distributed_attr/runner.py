"""The attribution job: plan the store, start the actors, feed them units, commit their results.

Design (argued in docs/architecture.md): plain Ray actors, one model replica each, fed whole work
units by the driver with a bounded number in flight per actor. A unit is the retry, resume and
write granularity: exactly one Zarr shard of every array. The driver is the only process that
writes metadata; it marks a unit done only after the worker returned, i.e. after the unit's data
are durable. A crashed actor is restarted by Ray and its unit resubmitted; because a unit rewrites
its whole shard, at-least-once execution still leaves every image written exactly once.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import Config, diff_configs, load_config, upgrade_stored_config
from .io.lease import LeaseError, StoreLease
from .io.sources import decode_image, fingerprint_differences
from .io.storage import (call_with_retries, describe_error, is_remote, is_transient, local_path,
                         set_retry_window)
from .io.store import KIND_WORDS, AttributionStore, StoreError, StorePlan, classify_path, clear_store
from .methods.choices import describe_choice
from .pipeline import UnitProcessor, UnitResult


class JobError(RuntimeError):
    """The job cannot go on (a unit keeps failing, the store refuses, ...)."""


@dataclass
class RunSummary:
    store: str
    images: int
    units: int
    units_done: int
    units_this_run: int
    failures: dict[int, str]
    seconds: float
    images_per_second: float
    interrupted: bool = False
    workers: int = 0
    retries: int = 0
    methods: list[str] = field(default_factory=list)
    #: seconds the driver spent dispatching units and committing results (its cost per unit)
    driver_seconds: float = 0.0
    #: CPU seconds of the whole driver process while the actors worked (Ray's threads included)
    driver_cpu_seconds: float = 0.0
    #: unit -> the worker that wrote it this run ("host:node:pid:device"; "" in-process)
    unit_workers: dict[int, str] = field(default_factory=dict)
    #: per method, over the store's usable images: maps, degenerate, all_zero, constant,
    #: non_finite (``AttributionStore.degenerate_counts``)
    degenerate: dict[str, dict[str, int]] = field(default_factory=dict)
    #: what the job warns about (coarse CAM grids, degenerate maps), as recorded in ``warnings``
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        state = "interrupted" if self.interrupted else ("complete" if self.units_done == self.units else "incomplete")
        lines = [
            f"store: {self.store} ({state})",
            f"images: {self.images} in {self.units} units; units done: {self.units_done}/{self.units}"
            f" ({self.units_this_run} this run, {self.retries} retried)",
            f"methods: {', '.join(self.methods)}",
            f"throughput: {self.images_per_second:.1f} images/s over {self.seconds:.1f} s with {self.workers} worker(s)",
            f"failed images: {len(self.failures)}",
        ]
        for idx, why in list(sorted(self.failures.items()))[:5]:
            lines.append(f"  image {idx}: {why}")
        lines += _degenerate_lines(self.degenerate)
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _degenerate_lines(counts: dict[str, dict[str, int]]) -> list[str]:
    """The summary's lines on degenerate maps: one when there are none, else one per method."""
    if not counts:
        return []
    if not any(c.get("degenerate") for c in counts.values()):
        n = max(c.get("maps", 0) for c in counts.values())
        return [f"degenerate maps: none (0 all-zero, 0 constant, 0 non-finite of {n} per method, {len(counts)} "
                f"method{'s' if len(counts) != 1 else ''})"]
    lines = ["degenerate maps (all-zero, constant, non-finite of the usable maps):"]
    for method, c in counts.items():
        lines.append(f"  {method}: {c.get('all_zero', 0)} all-zero, {c.get('constant', 0)} constant, "
                     f"{c.get('non_finite', 0)} non-finite of {c.get('maps', 0)}")
    return lines


def make_plan(cfg: Config, n_images: int, attrs: dict[str, Any]) -> StorePlan:
    """The store's full layout, decided before any work starts."""
    metric_outputs = {}
    if cfg.metrics:
        from .metrics.base import MetricContext
        from .pipeline import build_metrics

        mctx = MetricContext(budget=cfg.run.max_batch, evaluator_names=tuple(cfg.evaluators))
        for metric in build_metrics(cfg):
            outs = metric.outputs(mctx)
            coords = metric.coords(mctx) if hasattr(metric, "coords") else {}
            metric_outputs[metric.name] = {
                o: (tuple(dims), tuple(sizes), {d: coords.get(d) for d in dims if d in coords})
                for o, (dims, sizes) in outs.items()
            }
    frequencies = None
    if cfg.spectra.enabled:
        from .spectral import radial_frequencies

        frequencies = [float(f) for f in radial_frequencies(cfg.data.image_size, cfg.data.image_size)]
    scale = cfg.data.image_size / cfg.filters.reference_size
    return StorePlan(
        n_images=n_images,
        unit_size=cfg.run.unit_size,
        image_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
        methods=list(cfg.methods),
        map_dtype=cfg.run.map_dtype,
        frequencies=frequencies,
        cutoffs=cfg.cutoffs(),
        stored_cutoffs=[s * scale for s in cfg.filters.store_maps],
        metric_outputs=metric_outputs,
        attrs=attrs,
        ground_truth_mask=cfg.data.mask_column is not None,
    )


def prepare_store(cfg: Config, *, resume: bool, overwrite: bool,
                  inputs: list[str] | None = None) -> tuple[AttributionStore, UnitProcessor, StoreLease]:
    """Validate the inputs on the driver (so mistakes fail before any actor starts and before the
    store exists), take the store's lease, then create the store or check that it may be resumed.

    ``inputs``: extra paths the job reads (the config file); the store may hold none of them."""
    from .io.models import fingerprint

    probe = UnitProcessor(cfg, device="cpu")
    n_images = probe.n_images()
    if n_images == 0:
        raise JobError(f"the dataset at {cfg.data.path!r} holds no images")
    validate_inputs(cfg, probe)
    choices, coarse = resolve_method_choices(cfg, probe)
    attrs = {
        "config": cfg.to_dict(redact=True),
        "config_hash": cfg.result_hash(),
        "model_fingerprint": fingerprint(probe.model),
        "evaluators": list(cfg.evaluators),
        "source": probe.source.describe(),
        "dataset_fingerprint": probe.source.fingerprint(),
        "software": _software(),
        # what the methods chose for the user (CAM layers, canonizer, token grids), and one line
        # for each (``inspect``, ``report``); resume compares the choices
        "resolved": {"methods": choices, "described": {m: describe_choice(m, c) for m, c in choices.items()}},
        "warnings": coarse,
    }
    path, so = cfg.store, cfg.storage_options
    if not is_remote(path):
        _refuse_store_holding_inputs(Path(local_path(path)), cfg, inputs or [])
    kind = classify_path(path, so)
    if kind in ("file", "foreign"):
        raise StoreError(f"store {cfg.store!r} is {KIND_WORDS[kind]}; nothing there was changed. "
                         "Choose a path that does not exist yet (or an empty folder) for the store.")
    #: why a store that holds no finished unit is replaced without --overwrite (None: it is not)
    replace = _replace_unfinished(cfg, attrs, n_images, resume) if kind == "store" and not overwrite else None
    if kind == "store" and not overwrite and replace is None:
        # Refuse early, without taking the lease, when the store cannot be resumed anyway.
        store = AttributionStore.open(path, storage_options=so)
        _check_resumable(store, cfg, attrs, n_images, resume)
    try:
        # refused while another driver holds the store
        lease = StoreLease.acquire(path, ttl=cfg.run.lease_seconds, storage_options=so)
    except LeaseError as exc:
        raise StoreError(str(exc)) from None
    try:
        if replace is not None:
            # again, now that we hold it: a driver may have finished a unit in between
            replace = _replace_unfinished(cfg, attrs, n_images, resume)
            if replace is None:
                raise StoreError(f"the store {cfg.store!r} changed while this job started; run the command again")
            print(f"run: replacing the store {cfg.store!r}: {replace}", file=sys.stderr)
            overwrite = True
        if kind == "store" and not overwrite:
            store = AttributionStore.open(path, storage_options=so)
            _check_resumable(store, cfg, attrs, n_images, resume)  # again, now that we hold it
            bad = store.verify(decode=False)
            if bad:
                print(f"resume: {len(bad)} done unit(s) have missing shards and are recomputed: "
                      + "; ".join(f"unit {u}: {why}" for u, why in list(bad.items())[:3]), file=sys.stderr)
                store.mark_not_done(bad)
            return store, probe, lease
        kept: list[str] = []
        if kind == "store":
            kept = clear_store(path, so)
            if kept:
                print(f"overwrite: kept {len(kept)} entr{'y that is' if len(kept) == 1 else 'ies that are'} not part "
                      f"of the store: {', '.join(kept[:5])}", file=sys.stderr)
        store = AttributionStore.create(path, make_plan(cfg, n_images, attrs), kept=kept, storage_options=so)
        return store, probe, lease
    except BaseException:
        lease.release()
        raise


def _check_resumable(store: AttributionStore, cfg: Config, attrs: dict[str, Any], n_images: int,
                     resume: bool) -> None:
    old = store.attrs
    diffs = diff_configs(upgrade_stored_config(old.get("config", {})), attrs["config"])
    if old.get("model_fingerprint") != attrs["model_fingerprint"]:
        diffs.append("model weights differ (fingerprint)")
    if old.get("n_images") != n_images:
        diffs.append(f"dataset size: {old.get('n_images')} -> {n_images} images")
    diffs += fingerprint_differences(old.get("dataset_fingerprint") or {}, attrs["dataset_fingerprint"])
    diffs += resolved_differences(old.get("resolved"), attrs.get("resolved"))
    if diffs:
        raise StoreError(
            f"the store {cfg.store!r} was made with a different config or dataset; refusing to mix results. "
            "Differences: " + "; ".join(diffs) + ". Pass --overwrite to start over, or use another store path."
        )
    done = len(store.done_units())
    if not resume and done:
        raise StoreError(
            f"the store {cfg.store!r} exists with {done}/{store.n_units} units done. "
            "Pass --resume to finish it, or --overwrite to start over."
        )


def _replace_unfinished(cfg: Config, attrs: dict[str, Any], n_images: int, resume: bool) -> str | None:
    """Why the store at ``cfg.store`` is replaced without ``--overwrite``, or None: a store that holds
    no finished unit (its job failed, or was stopped, before the first commit; its creation was
    interrupted) loses nothing when replaced, so the corrected rerun need not ask. A store this
    job can use as it is (the same config) is kept; one with any finished unit is never replaced."""
    from .io.store import unfinished_store

    why = unfinished_store(cfg.store, cfg.storage_options)
    if why is None:
        return None
    try:
        store = AttributionStore.open(cfg.store, storage_options=cfg.storage_options)
        _check_resumable(store, cfg, attrs, n_images, resume)
    except StoreError as exc:
        made = "it was made with a different config or dataset" if "different config" in str(exc) else str(exc)
        return f"{why}, and {made}" if why.startswith("its job") else why
    return None


def resolve_method_choices(cfg: Config, probe: UnitProcessor) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """What the methods choose for the user on the probe's model (``methods.choices``): the CAM
    layer of every layer method and its grid, LRP's canonizer, the attention's token grid; printed
    (one line each) and returned with the warnings about CAM grids under 4x4 (printed too). A
    layer that cannot be resolved fails the job here, before the store exists."""
    from .methods.choices import coarse_grid_warnings, resolve_choices

    example = torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    try:
        choices = resolve_choices(probe.model, probe.methods, example)
        coarse = coarse_grid_warnings(probe.model, example, choices)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise JobError(f"methods: {exc}"[:800]) from None
    for method, choice in choices.items():
        print(describe_choice(method, choice), file=sys.stderr)
    for warning in coarse:
        print(f"warning: {warning['message']}", file=sys.stderr)
    return choices, coarse


def resolved_differences(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """The automatic choices that differ between a store and this job (a CAM layer, canonizer or
    token grid chosen otherwise by another version), as resume differences. A store made before
    1.3 recorded none: nothing to compare."""
    if not old or new is None:
        return []
    return [f"resolved.{d} (chosen for you; the maps would mix both)"
            for d in diff_configs({"methods": old.get("methods") or {}}, {"methods": new.get("methods") or {}})]


def degenerate_warnings(counts: dict[str, dict[str, int]], fraction: float) -> list[dict[str, Any]]:
    """One warning (``{"kind": "degenerate_maps", "method", "degenerate", "maps", "message"}``) per
    method more than ``fraction`` of whose usable maps are degenerate, naming the likely cause of
    its most frequent kind (``methods.degenerate.likely_cause``)."""
    from .methods import METHODS
    from .methods.degenerate import likely_cause

    out = []
    for method, c in counts.items():
        n, bad = c.get("maps", 0), c.get("degenerate", 0)
        if not n or bad <= fraction * n:
            continue
        kinds = {k: c.get(k, 0) for k in ("all_zero", "constant", "non_finite")}
        cls = METHODS.get(method) if method in METHODS else None
        cause = likely_cause(max(kinds, key=kinds.get), getattr(cls, "family", ""), getattr(cls, "needs_layer", False))
        out.append({
            "kind": "degenerate_maps", "method": method, "degenerate": int(bad), "maps": int(n),
            "message": (f"{method}: {bad} of {n} maps ({100 * bad / n:.0f}%) are degenerate ({kinds['all_zero']} "
                        f"all-zero, {kinds['constant']} constant, {kinds['non_finite']} non-finite), more than "
                        f"run.degenerate_warn_fraction = {fraction:g}: {cause}"),
        })
    return out


def _refuse_store_holding_inputs(store: Path, cfg: Config, inputs: list[str]) -> None:
    """The store may not be, or contain, anything the job reads: ``store: .``, the config's folder,
    the data folder or a folder above it. Refused even with --overwrite: a typo must not be able to
    make the job delete its own inputs."""
    store = store.resolve()
    paths = {"the config file": inputs, "data.path": [cfg.data.path], "data.labels_path": [cfg.data.labels_path],
             "model.weights": [cfg.model.weights]}
    paths.update({f"evaluators.{k}.weights": [m.weights] for k, m in cfg.evaluators.items()})
    for what, items in paths.items():
        for item in items:
            if not item or "://" in str(item):
                continue
            # the folder part before any glob character
            head = str(item).split("*")[0].split("?")[0].split("[")[0]
            target = Path(head).resolve()
            if target == store or store in target.parents:
                raise StoreError(f"store {cfg.store!r} holds {what} ({item}); refusing to write there. "
                                 "Put the store in a folder of its own, e.g. 'out/attributions.zarr'.")
    if store == Path.cwd().resolve() or store in Path.cwd().resolve().parents or store == Path.home().resolve():
        raise StoreError(f"store {cfg.store!r} is the current folder, one above it, or the home folder; "
                         "put the store in a folder of its own, e.g. 'out/attributions.zarr'.")


def validate_inputs(cfg: Config, probe: UnitProcessor) -> None:
    """Checks that would otherwise fail only at the first unit, after the store exists: the data's
    channels and size against the model (one forward pass on a real image), the target class
    against the model's classes, the labels when ``target: label``, and ground-truth masks for
    the metrics that compare maps with them."""
    for method in probe.methods:
        reason = type(method).unsupported_reason(probe.model)
        if reason is not None:
            raise JobError(f"methods.{method.name} cannot explain this model: {reason}")
    need_masks = [m.name for m in probe.metrics if m.needs_masks]
    if need_masks and cfg.data.mask_column is None:
        raise JobError(f"metrics {need_masks} compare maps with ground-truth masks, but the data have none: set "
                       "data.mask_column to the Parquet column that holds each image's mask")
    first = None
    for rec in probe.source.read(0, min(probe.n_images(), 16)):
        try:
            first = decode_image(rec.payload, cfg.data)
            break
        except Exception:
            continue  # a corrupt image fails alone later; look for a decodable one
    x = first[None] if first is not None else torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    try:
        classes = int(probe.probe_output(x).shape[1])
    except Exception as exc:
        raise JobError(f"the model cannot take this data (data.channels={cfg.data.channels}, "
                       f"data.image_size={cfg.data.image_size}): {type(exc).__name__}: {exc}"[:600]) from None
    probe.num_classes = classes
    target = cfg.run.target
    if not isinstance(target, str) and not 0 <= target < classes:
        raise JobError(f"run.target: class {target} is out of range; the model has {classes} classes (0..{classes - 1})")
    if target == "label":
        labels = probe.source.labels_all()
        if labels is not None:
            labels = labels[: probe.n_images()]
            bad = labels[(labels >= classes) | (labels < -1)]
            if bad.size:
                raise JobError(f"run.target is 'label' but {bad.size} label(s) are not classes of the model "
                               f"(0..{classes - 1}), e.g. {sorted(set(bad.tolist()))[:5]}; check data.label_column")
    check_model_parameters(cfg, probe, x)


def check_model_parameters(cfg: Config, probe: UnitProcessor, x: torch.Tensor) -> None:
    """Every method's and metric's ``check_model`` on the probe model and one real image ``x``
    (1, C, H, W): parameters that name parts of the model (a CAM layer, the ReLUs guided
    backpropagation rewrites, the layers a randomisation test re-initialises) are checked here,
    before the store exists, instead of failing the first unit. The error names the config key
    (``methods.gradcam.layer``) and says what the model offers."""
    from .commons import ModelCheckError
    from .methods import Context
    from .methods.choices import context_layer
    from .pipeline import AUTOCAST

    # the layer the job's context will carry (the workers' own function); a failure is each CAM
    # method's own to report
    try:
        layer = context_layer(probe.model, probe.methods, x[:1])
    except ValueError:
        layer = None
    ctx = Context(seed=cfg.run.seed, budget=cfg.run.max_batch, autocast=AUTOCAST[cfg.run.autocast], layer=layer,
                  indices=torch.zeros(1, dtype=torch.int64))
    checks = [("methods", m, lambda m=m: m.check_model(probe.model, x[:1], ctx)) for m in probe.methods]
    checks += [("metrics", m, lambda m=m: m.check_model(probe.model, x[:1])) for m in probe.metrics]
    for section, item, check in checks:
        try:
            check()
        except ModelCheckError as exc:
            key = f"{section}.{item.name}" + (f".{exc.param}" if exc.param else "")
            raise JobError(f"{key}: {exc}"[:1200]) from None
        except Exception as exc:  # a check that runs the method (LRP, DeepLIFT) failed otherwise
            raise JobError(f"{section}.{item.name}: the method cannot run on this model: "
                           f"{type(exc).__name__}: {exc}"[:1200]) from None


def _software() -> dict[str, str]:
    import numpy
    import torch
    import zarr

    from . import __version__

    return {"distributed_attr": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": numpy.__version__, "python": sys.version.split()[0]}


def run(
    config: "str | Path | dict | Config",
    *,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    _after_dispatch: Callable[[int, Any], None] | None = None,
    _after_commit: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run the attribution job described by ``config`` (a YAML path, a dict or a ``Config``).

    ``address``: a Ray cluster to join ("auto" for the current one); a local Ray instance
    otherwise. ``resume`` finishes an existing store; ``overwrite`` replaces it. The two hooks are
    for tests (fault injection)."""
    cfg = load_config(config)
    t0 = time.perf_counter()
    inputs = [str(config)] if isinstance(config, (str, Path)) else []
    # every object store this job opens (store, lease, sources, weights) retries over the window
    window = set_retry_window(cfg.run.storage_retry_seconds)
    prepared = False
    try:
        store, probe, lease = prepare_store(cfg, resume=resume, overwrite=overwrite, inputs=inputs)
        prepared = True
        lease.start_heartbeat()
        failed = True
        try:
            summary = _run_store(cfg, store, probe, lease, t0, address, progress, _after_dispatch, _after_commit)
            failed = False
            return summary
        finally:
            try:
                if lease.lost is None and not lease.at_risk():  # batched commits of units whose data are durable
                    try:
                        call_with_retries(store.flush, before_retry=lease.check)
                    except Exception:
                        if not failed:
                            raise
                        # the job's own error is the one to report; flags not written are recomputed on resume
            finally:
                lease.release()
    except Exception as exc:
        if not is_transient(exc) or _is_user_error(exc):
            raise  # user errors (a missing bucket, a refused store) keep their own message
        # the driver's own reads and writes (commits, bookkeeping) outlasted the retry window
        after = ("The units committed so far are kept: `run --resume` finishes the job once the store answers again."
                 if prepared else "No unit was committed: rerun the job once the store answers again "
                 "(a store it left half-created is replaced).")
        raise JobError(f"object storage still failing after retrying for run.storage_retry_seconds="
                       f"{cfg.run.storage_retry_seconds:g} s: {describe_error(exc, cfg.store)}. {after}") from exc
    finally:
        set_retry_window(window)


def _is_user_error(exc: BaseException) -> bool:
    from .config import ConfigError
    from .io.models import ModelError
    from .io.sources import SourceError

    return isinstance(exc, (ConfigError, SourceError, ModelError, StoreError, JobError, LeaseError))


def _run_store(cfg: Config, store: AttributionStore, probe: UnitProcessor, lease: StoreLease, t0: float,
               address: str | None, progress: bool, _after_dispatch: Callable[[int, Any], None] | None,
               _after_commit: Callable[[int], None] | None) -> RunSummary:
    done = set(store.done_units().tolist())
    pending = [u for u in range(store.n_units) if u not in done]
    images_pending = sum(store.unit_range(u)[1] - store.unit_range(u)[0] for u in pending)
    bar = _progress_bar(progress, store.n_images, store.n_images - images_pending)
    state: dict[str, Any] = {"images": 0, "failures": 0, "retries": 0, "units": 0, "driver_seconds": 0.0,
                             "dataset_fingerprint": store.attrs.get("dataset_fingerprint"), "unit_workers": {},
                             "source_plan": probe.source.plan()}

    def commit(res: UnitResult) -> None:
        t = time.perf_counter()
        lease.check()  # never mark work done in a store another driver has taken over
        # a commit that meets an object-store outage is tried again within run.storage_retry_seconds
        # (the lease checked before each try); it rewrites the same flags, so repeating is harmless
        call_with_retries(lambda: store.commit_unit(res.unit, res.seconds, res.failures, checksums=res.checksums),
                          before_retry=lease.check)
        state["driver_seconds"] += time.perf_counter() - t
        state["unit_workers"][res.unit] = res.worker
        state["images"] += res.images
        state["failures"] += len(res.failures)
        state["units"] += 1
        if bar is not None:
            bar.update(res.images)
            elapsed = time.perf_counter() - state["t_start"]
            bar.set_postfix(units=f"{len(done) + state['units']}/{store.n_units}", failed=state["failures"],
                            img_s=f"{state['images'] / max(elapsed, 1e-9):.1f}")
        if _after_commit is not None:
            _after_commit(res.unit)

    interrupted = False
    workers = cfg.run.num_workers
    # Throughput is measured from when the workers are ready: actor start-up (model loading,
    # imports) is reported apart as ``startup_seconds``.
    state["t_start"] = time.perf_counter()
    try:
        if workers == 0 or not pending:
            _run_in_process(cfg, probe, pending, commit, state)
        else:
            from .ray_session import ray_session

            del probe  # free the driver's replica before actors load theirs
            with ray_session(address, num_cpus=None):
                _run_on_ray(cfg, pending, commit, state, _after_dispatch)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - state["t_start"]
    # the batched done flags first, as a commit writes them: only while the lease is ours (a driver
    # that lost it, or may lose it any moment, writes nothing more), retried through an outage
    lease.check()
    call_with_retries(store.flush, before_retry=lease.check)
    summary = RunSummary(
        store=cfg.store,
        images=store.n_images,
        units=store.n_units,
        units_done=len(store.done_units()),
        units_this_run=state["units"],
        failures=store.failures(),
        seconds=seconds,
        images_per_second=state["images"] / seconds if seconds > 0 else 0.0,
        interrupted=interrupted,
        workers=workers,
        retries=state["retries"],
        methods=list(cfg.methods),
        driver_seconds=state["driver_seconds"],
        driver_cpu_seconds=state.get("driver_cpu_seconds", 0.0),
        unit_workers=dict(state["unit_workers"]),
    )
    # degenerate maps over the whole store (this run's units and earlier ones), and the warnings
    summary.degenerate = store.degenerate_counts()
    warnings = [w for w in store.attrs.get("warnings") or [] if w.get("kind") != "degenerate_maps"]
    warnings += degenerate_warnings(summary.degenerate, cfg.run.degenerate_warn_fraction)
    summary.warnings = [str(w.get("message", w)) for w in warnings]
    store.set_attrs(warnings=warnings)
    store.set_attrs(last_run={"seconds": round(seconds, 3), "images": state["images"],
                              "images_per_second": round(summary.images_per_second, 3), "workers": workers,
                              "interrupted": interrupted, "total_seconds": round(time.perf_counter() - t0, 3),
                              "startup_seconds": round(state.get("startup_seconds", 0.0), 3),
                              "driver_seconds": round(state["driver_seconds"], 3),
                              "units_per_worker": dict(Counter(state["unit_workers"].values()))})
    return summary


def _run_in_process(cfg: Config, probe: UnitProcessor, pending: list[int], commit: Callable[[UnitResult], None],
                    state: dict[str, Any]) -> None:
    """The units one after another in the driver (``num_workers: 0``). A unit that fails with an
    object-store fault that outlasted ``run.storage_retry_seconds`` goes back to the front of the
    queue, as on Ray, counted against ``run.max_retries``; any other error fails the job."""
    queue = deque(pending)
    failed: dict[int, int] = {}
    while queue:
        results = probe.process_units(list(queue))
        try:
            for res in results:
                commit(res)
                queue.popleft()  # units come back in queue order
        except (KeyboardInterrupt, LeaseError):
            raise
        except Exception as exc:  # the same message the Ray path gives for our own code's errors
            unit = getattr(exc, "unit", None)
            if unit is None:
                raise
            if not is_transient(exc):
                raise JobError(f"unit {unit} failed: {type(exc).__name__}: {exc}") from exc
            state["retries"] += 1
            failed[unit] = failed.get(unit, 0) + 1
            if failed[unit] > cfg.run.max_retries:
                raise JobError(_storage_gave_up(unit, failed[unit], cfg, exc)) from exc
            print(f"unit {unit}: object storage failed after run.storage_retry_seconds="
                  f"{cfg.run.storage_retry_seconds:g} s; the unit goes back to the queue: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        finally:
            results.close()  # an interrupted run lets the write in progress end


def _storage_gave_up(unit: int, times: int, cfg: Config, exc: BaseException) -> str:
    return (f"unit {unit} could not read or write object storage {times} times, each after retrying for "
            f"run.storage_retry_seconds={cfg.run.storage_retry_seconds:g} s (run.max_retries={cfg.run.max_retries}); "
            f"last error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="attribute", dynamic_ncols=True, file=sys.stderr)


def _run_on_ray(cfg: Config, pending: list[int], commit: Callable[[UnitResult], None], state: dict[str, Any],
                after_dispatch: Callable[[int, Any], None] | None) -> None:
    """Feed ``pending`` units to ``num_workers`` actors until every unit is committed.

    Fault model: an actor that crashes, is killed, or loses its node takes the units it held back
    to the queue. Only the unit it was *executing* (the oldest it held: an actor runs its calls in
    order) counts as an execution that died; the ones waiting behind it never ran. The lost actor
    gets no work until it answers again (Ray restarts it, possibly on another node), so a restart
    never burns a unit's attempts, and the other actors finish the queue meanwhile. The job fails
    when a unit's executions die more than ``run.max_retries`` times, or when no actor has been
    alive for ``run.actor_timeout`` seconds."""
    import ray

    gpus = resolve_gpus(cfg.run.gpus_per_worker)
    worker_cls = ray.remote(AttributionWorker).options(
        num_cpus=cfg.run.cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
    )
    cfg_dict = cfg.to_dict()
    threads = max(1, int(cfg.run.cpus_per_worker))
    dataset = state.get("dataset_fingerprint")
    # one copy of the listing in the object store, however many actors read it
    plan = ray.put(state["source_plan"]) if state.get("source_plan") is not None else None
    actors = [worker_cls.remote(cfg_dict, threads, dataset, plan) for _ in range(cfg.run.num_workers)]
    _wait_for_actors(actors, {"CPU": cfg.run.cpus_per_worker, "GPU": gpus}, cfg.run.placement_timeout)
    state["startup_seconds"] = time.perf_counter() - state["t_start"]
    state["t_start"] = time.perf_counter()
    cpu0 = time.process_time()
    pool = _ActorPool(actors, cfg.run.units_in_flight)
    queue = deque(pending)
    deaths: dict[int, int] = {}  # unit -> executions of it that died with their actor
    try:
        while queue or pool.busy():
            t = time.perf_counter()
            sent = pool.dispatch(queue)
            state["driver_seconds"] += time.perf_counter() - t  # with commit(): the driver's cost per unit
            for unit, i in sent:
                if after_dispatch is not None:
                    after_dispatch(unit, actors[i])
            if not pool.any_alive() and pool.down_seconds() > cfg.run.actor_timeout:
                raise JobError(f"no actor has been alive for {pool.down_seconds():.0f} s (run.actor_timeout); "
                               f"{len(queue)} unit(s) still to do. Ray restarts lost actors only where a node "
                               f"offers what they ask for (num_cpus={cfg.run.cpus_per_worker}, num_gpus={gpus}); "
                               f"the cluster has {ray.available_resources()} available")
            for event in pool.wait(timeout=1.0):
                if isinstance(event, UnitResult):
                    commit(event)
                    continue
                lost_units, executing, exc = event
                if executing:
                    state["retries"] += 1
                for unit in executing:
                    deaths[unit] = deaths.get(unit, 0) + 1
                    if deaths[unit] > cfg.run.max_retries:
                        if is_transient(exc):
                            raise JobError(_storage_gave_up(unit, deaths[unit], cfg, exc))
                        raise JobError(f"unit {unit} was running on an actor that died {deaths[unit]} "
                                       f"times (run.max_retries={cfg.run.max_retries}); last error: {exc}")
                if executing and is_transient(exc):
                    print(f"unit {executing[0]}: object storage failed after run.storage_retry_seconds="
                          f"{cfg.run.storage_retry_seconds:g} s; the unit goes back to the queue: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
                queue.extendleft(reversed(lost_units))  # lost units first, in their order
    finally:
        # all of the driver process's CPU time (its threads, Ray's client threads) while units ran
        state["driver_cpu_seconds"] = time.process_time() - cpu0
        for a in actors:
            ray.kill(a, no_restart=True)


def resolve_gpus(setting: float | str) -> float:
    """GPUs per actor. ``auto``: 1 when the cluster has GPUs now, or can add nodes that have them
    (the cluster launcher's node types, read from the head's bootstrap config), else 0. A number
    is taken as it is: 0.25 packs four replicas of a small model onto each GPU."""
    import ray

    if setting != "auto":
        return float(setting)
    if ray.cluster_resources().get("GPU", 0) > 0:
        return 1.0
    return 1.0 if _autoscaler_offers_gpus() else 0.0


def _autoscaler_offers_gpus(path: str = "~/ray_bootstrap_config.yaml") -> bool:
    """Whether the cluster launcher's config (copied to the head node as ``path``) declares a node
    type with GPUs: an autoscaling cluster starts without GPU nodes, and resolving ``auto`` to 0
    there would pack CPU-only actors onto the GPU nodes once they come."""
    import yaml

    try:
        with open(os.path.expanduser(path)) as fh:
            node_types = (yaml.safe_load(fh) or {}).get("available_node_types") or {}
    except (OSError, yaml.YAMLError):
        return False
    return any(float((t.get("resources") or {}).get("GPU", 0) or 0) > 0 for t in node_types.values()
               if isinstance(t, dict))


def _wait_for_actors(actors: list[Any], asks: dict[str, float], timeout: float, every: float = 30.0) -> None:
    """Wait until every actor has started (its model loaded). Says, every ``every`` seconds, what
    the actors wait for and what the cluster offers; fails after ``timeout`` with that message,
    and at once with the actor's own error when one cannot start (a model that does not load)."""
    import ray
    from ray.exceptions import RayActorError

    refs = {a.pid.remote(): a for a in actors}
    t0 = last = time.monotonic()
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=min(every, 5.0))
        for ref in ready:
            refs.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as exc:
                raise JobError(f"an actor could not start: {_actor_error(exc)}") from None
        waited = time.monotonic() - t0
        if refs and (waited > timeout or time.monotonic() - last >= every):
            last = time.monotonic()
            nodes = [_resources(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
            msg = (f"{len(refs)} of {len(actors)} actor(s) not started after {waited:.0f} s; each asks for "
                   f"{ {k: float(v) for k, v in asks.items() if v} } on one node; the cluster has "
                   f"{_resources(ray.available_resources())} available of {_resources(ray.cluster_resources())}, "
                   f"its nodes offer {nodes}")
            if _probably_starting(asks, len(actors), ray.available_resources(), ray.cluster_resources()):
                # a started actor holds its CPUs while its constructor runs: "{} available" is then
                # the actors themselves, not a lack of resources
                msg += (f"; the {len(actors)} actor(s) together hold what they ask for, so they are placed and "
                        "still starting (importing torch, loading the model: slow on a busy machine)")
            if waited > timeout:
                raise JobError(msg + f" (run.placement_timeout={timeout:.0f} s). Lower run.cpus_per_worker/"
                               "gpus_per_worker or num_workers, or add nodes that offer them.")
            print(f"waiting: {msg}", file=sys.stderr)


def _probably_starting(asks: dict[str, float], n_actors: int, available: dict[str, float],
                       total: dict[str, float]) -> bool:
    """True when what is in use is exactly what ``n_actors`` actors asking ``asks`` hold: they
    have been placed and their constructors are still running."""
    asked = {k: float(v) * n_actors for k, v in asks.items() if v}
    used = {k: float(total.get(k, 0)) - float(available.get(k, 0)) for k in asked}
    return bool(asked) and all(abs(used[k] - asked[k]) < 1e-6 for k in asked)


def _resources(res: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in sorted(res.items()) if k in ("CPU", "GPU") or k.startswith("accelerator")}


def _actor_error(exc: BaseException) -> str:
    """The useful line of an actor's creation error (its own exception, not Ray's wrapping)."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error" in line.split(":")[0] or "Exception" in line.split(":")[0]):
            return line[:600]
    return text.splitlines()[0][:600] if text else type(exc).__name__


#: most units in one actor call. A call costs the driver ~1-2 ms of CPU however long it runs, so
#: calls of several units let one driver feed hundreds of GPU actors; sizes shrink as the queue
#: empties (guided scheduling), so the last calls are single units and the tail stays balanced.
MAX_UNITS_PER_CALL = 8


# Ray's actor errors say what happened only in their message (Ray 2.x has no field for it), so
# the two readings of it live here, worded after the messages the pinned Ray writes, and are
# tested through real actor deaths (tests/test_faults.py, tests/test_cluster.py).
def _never_reached_the_actor(exc: BaseException) -> bool:
    """An ``ActorUnavailableError`` for a call sent while the actor was restarting: the call never
    ran (as opposed to a connection that broke while the actor held it, a process killed mid-unit)."""
    return "restarting" in str(exc).lower()


def _will_not_restart(exc: BaseException) -> bool:
    """An ``ActorDiedError`` after which Ray will not bring the actor back (restarts used up, or
    none allowed): the actor is dead for the rest of the job."""
    text = str(exc).lower()
    return "restart" not in text or "will not" in text


class _ActorPool:
    """The driver's view of its actors: which are alive, what each holds (in call order), and
    the probes that find out when a lost actor is back."""

    def __init__(self, actors: list[Any], per_actor: int):
        self.actors = actors
        self.per_actor = per_actor
        self.held: list[deque] = [deque() for _ in actors]  # per actor: (ref, units), oldest call first
        self.refs: dict[Any, int] = {}  # unit call ref -> actor
        self.alive = [True] * len(actors)
        self.dead = [False] * len(actors)  # will never come back (Ray gave up restarting it)
        self.probes: dict[Any, int] = {}  # probe ref -> actor
        self.next_probe = [0.0] * len(actors)
        self.all_down_since: float | None = None

    def busy(self) -> bool:
        return bool(self.refs)

    def any_alive(self) -> bool:
        return any(self.alive)

    def down_seconds(self) -> float:
        return 0.0 if self.all_down_since is None else time.monotonic() - self.all_down_since

    def dispatch(self, queue: deque) -> list[tuple[int, int]]:
        sent = []
        slots = max(1, sum(self.alive) * self.per_actor)
        for i, actor in enumerate(self.actors):
            while self.alive[i] and queue and len(self.held[i]) < self.per_actor:
                size = min(MAX_UNITS_PER_CALL, max(1, math.ceil(len(queue) / (4 * slots))))
                units = [queue.popleft() for _ in range(min(size, len(queue)))]
                ref = actor.process_many.remote(units)
                self.held[i].append((ref, units))
                self.refs[ref] = i
                sent += [(u, i) for u in units]
        return sent

    def wait(self, timeout: float) -> list[Any]:
        """Block until a call finishes, an actor is lost, or a lost actor is back (or ``timeout``).
        Returns finished ``UnitResult``s and ``(lost units, units that were executing, error)``."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        self._send_probes()
        waiting = list(self.refs) + list(self.probes)
        if not waiting:
            time.sleep(min(timeout, 0.2))
            return []
        ready, rest = ray.wait(waiting, num_returns=1, timeout=timeout)
        if ready and rest:  # take everything that is ready in one go: one wait per batch, not per unit
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        events: list[Any] = []
        for ref in ready:
            if ref in self.probes:
                self._probe_answered(ref)
                continue
            i = self.refs.pop(ref, None)
            if i is None:
                continue  # a call of a lost actor, already put back in the queue
            try:
                results: list[UnitResult] = ray.get(ref)
            except ActorUnavailableError as exc:
                # Either the call never reached a live actor ("the actor is restarting": it was sent
                # before we knew), or the connection broke while the actor held it ("socket
                # closed": a process killed mid-unit); only the latter is an execution that died.
                events += self._lose(i, ref, exc, executed=not _never_reached_the_actor(exc))
            except RayTaskError as exc:
                # An exception in our own code is deterministic: retrying would fail again.
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                unit = getattr(cause, "unit", None)
                call = next(u for r, u in self.held[i] if r == ref)
                if unit is None:
                    unit = call[0]
                if is_transient(cause):
                    # Object storage still failing after the retry window: the call's units go back
                    # to the queue (those before ``unit`` were written, and rewrite the same shards);
                    # ``unit`` counts as an execution that died. The actor itself is fine.
                    self.held[i] = deque((r, u) for r, u in self.held[i] if r != ref)
                    events.append((list(call), [unit], cause))
                    continue
                raise JobError(f"unit {unit} failed: {type(cause).__name__}: {cause}") from None
            except RayActorError as exc:
                # The actor died (crash, OOM kill, node loss) while holding this call.
                events += self._lose(i, ref, exc, executed=True)
            else:
                self.held[i] = deque((r, u) for r, u in self.held[i] if r != ref)
                events += results
        return events

    def _lose(self, i: int, ref: Any, exc: Exception, executed: bool) -> list[Any]:
        """Actor ``i`` is lost: take back every unit it held. Only its oldest call can have been
        executing (an actor runs its calls in order); when another call reported the loss first,
        the oldest call's own outcome says whether it was running, or even finished. Every unit
        of the executing call counts as executed: which of them was running is not known."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        held = list(self.held[i])
        self.held[i].clear()
        for r, _ in held:
            self.refs.pop(r, None)
        self.alive[i] = False
        self.next_probe[i] = time.monotonic() + 0.5
        if not any(self.alive) and self.all_down_since is None:
            self.all_down_since = time.monotonic()
        if not held:
            return []
        (oldest, oldest_units), rest = held[0], [u for _, units in held[1:] for u in units]
        if oldest != ref:
            try:
                finished = ray.get(oldest, timeout=10)  # it finished before the actor was lost
                return [*finished, (rest, [], exc)]
            except ActorUnavailableError as e:
                exc, executed = e, not _never_reached_the_actor(e)
            except RayActorError as e:
                exc, executed = e, True
            except GetTimeoutError:
                executed = True  # no answer: assume the worst (it counts against max_retries)
        return [([*oldest_units, *rest], oldest_units if executed else [], exc)]

    def _send_probes(self) -> None:
        now = time.monotonic()
        pending = set(self.probes.values())
        for i, actor in enumerate(self.actors):
            if not self.alive[i] and not self.dead[i] and i not in pending and now >= self.next_probe[i]:
                self.probes[actor.pid.remote()] = i

    def _probe_answered(self, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        i = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:
            self.next_probe[i] = time.monotonic() + 0.5  # still restarting: ask again shortly
            return
        except ActorDiedError as exc:
            if _will_not_restart(exc):
                self.dead[i] = True
            self.next_probe[i] = time.monotonic() + 0.5
            return
        except RayActorError:
            self.next_probe[i] = time.monotonic() + 0.5
            return
        self.alive[i] = True
        self.all_down_since = None


def worker_device(gpu_ids: list, cuda_available: bool) -> str:
    """An actor computes on CUDA only when Ray assigned it a GPU and CUDA is there."""
    return "cuda" if gpu_ids and cuda_available else "cpu"


class AttributionWorker:
    """The Ray actor: one model replica, one ``UnitProcessor``.

    It uses a GPU only when Ray gave it one: Ray 2.60 no longer hides the GPUs from actors that
    asked for none, so ``torch.cuda.is_available()`` alone would put CPU actors on a GPU too.
    ``dataset``: the driver's fingerprint of the dataset; a node that sees other files (another
    mount, a stale copy) fails the job, naming itself, before it writes anything. ``plan``: the
    driver's listing of the dataset (``Source.plan``): the actor opens the source from it instead
    of listing the files and reading every Parquet footer or tar header again; it still compares
    each local file's size and modification time with the driver's (object stores are one view for
    every node, so remote files are not looked at again)."""

    def __init__(self, cfg_dict: dict[str, Any], threads: int = 1, dataset: dict[str, Any] | None = None,
                 plan: dict[str, Any] | None = None):
        import ray
        import torch

        torch.set_num_threads(threads)
        cfg = Config.from_dict(cfg_dict)
        set_retry_window(cfg.run.storage_retry_seconds)  # for the source, the weights and the store
        in_ray = ray.is_initialized()
        gpu_ids = ray.get_gpu_ids() if in_ray else []
        self.device = worker_device(gpu_ids, torch.cuda.is_available())
        self.processor = UnitProcessor(cfg, device=self.device, plan=plan)
        node = ray.get_runtime_context().get_node_id() if in_ray else "local"
        #: who wrote a unit: host, Ray node, process, device
        self.name = f"{os.uname().nodename}:{node[:12]}:{os.getpid()}:{self.device}"
        if dataset and not is_remote(cfg.data.path):
            seen = self.processor.source.fingerprint()  # with a plan: one stat per file
            diffs = fingerprint_differences(dataset, seen)
            if diffs:
                raise JobError(f"node {os.uname().nodename} ({node[:12]}) sees another dataset at "
                               f"{cfg.data.path!r} than the driver: {'; '.join(diffs[:3])}")

    def process(self, unit: int) -> UnitResult:
        res = self.processor.process(unit)
        res.worker = self.name
        return res

    def process_many(self, units: list[int]) -> list[UnitResult]:
        """Several units in one call (one driver round trip), through the actor's overlapped
        stages; each is written before the call returns. A failing unit's exception carries
        ``unit`` so the driver can name it."""
        try:
            results = list(self.processor.process_units(units))
        except Exception as exc:
            if is_transient(exc):
                exc.transient = True  # type: ignore[attr-defined]  (its __cause__ does not reach the driver)
            raise
        for res in results:
            res.worker = self.name
        return results

    def pid(self) -> int:
        return os.getpid()
