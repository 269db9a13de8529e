"""The attribution job: plan the store, start the actors, feed them units, commit their results.

Design (argued in docs/architecture.md): plain Ray actors, one model replica each, fed whole work
units by the driver with a bounded number in flight per actor. A unit is the retry, resume and
write granularity: exactly one Zarr shard of every array. The driver is the only process that
writes metadata; it marks a unit done only after the worker returned, i.e. after the unit's data
are durable. A crashed actor is restarted by Ray and its unit resubmitted; because a unit rewrites
its whole shard, at-least-once execution still leaves every image written exactly once.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import Config, diff_configs, load_config
from .io.store import AttributionStore, StoreError, StorePlan
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
        return "\n".join(lines)


def make_plan(cfg: Config, n_images: int, attrs: dict[str, Any]) -> StorePlan:
    """The store's full layout, decided before any work starts."""
    metric_outputs = {}
    if cfg.metrics:
        from .pipeline import build_metrics, metric_context

        names = list(cfg.evaluators)
        placeholder = {n: None for n in names}  # outputs() only needs the evaluator names
        mctx = metric_context(cfg, placeholder)  # type: ignore[arg-type]
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
    )


def prepare_store(cfg: Config, *, resume: bool, overwrite: bool) -> tuple[AttributionStore, UnitProcessor]:
    """Validate the inputs on the driver (so mistakes fail before any actor starts), then create
    the store or check that an existing one may be resumed."""
    from .io.models import fingerprint

    probe = UnitProcessor(cfg, device="cpu")
    n_images = probe.n_images()
    if n_images == 0:
        raise JobError(f"the dataset at {cfg.data.path!r} holds no images")
    attrs = {
        "config": cfg.to_dict(),
        "config_hash": cfg.result_hash(),
        "model_fingerprint": fingerprint(probe.model),
        "evaluators": list(cfg.evaluators),
        "source": probe.source.describe(),
        "software": _software(),
    }
    path = Path(cfg.store)
    if path.exists() and not overwrite:
        try:
            store = AttributionStore.open(path)
        except StoreError as exc:
            raise StoreError(f"{exc}. Pass --overwrite to replace it.") from None
        old = store.attrs
        diffs = diff_configs(old.get("config", {}), attrs["config"])
        if old.get("model_fingerprint") != attrs["model_fingerprint"]:
            diffs.append("model weights differ (fingerprint)")
        if old.get("n_images") != n_images:
            diffs.append(f"dataset size: {old.get('n_images')} -> {n_images} images")
        if diffs:
            raise StoreError(
                f"the store {cfg.store!r} was made with a different config; refusing to mix results. "
                "Differences: " + "; ".join(diffs) + ". Pass --overwrite to start over, or use another store path."
            )
        done = len(store.done_units())
        if not resume and done:
            raise StoreError(
                f"the store {cfg.store!r} exists with {done}/{store.n_units} units done. "
                "Pass --resume to finish it, or --overwrite to start over."
            )
        return store, probe
    store = AttributionStore.create(path, make_plan(cfg, n_images, attrs))
    return store, probe


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
    store, probe = prepare_store(cfg, resume=resume, overwrite=overwrite)
    done = set(store.done_units().tolist())
    pending = [u for u in range(store.n_units) if u not in done]
    images_pending = sum(store.unit_range(u)[1] - store.unit_range(u)[0] for u in pending)
    bar = _progress_bar(progress, store.n_images, store.n_images - images_pending)
    state: dict[str, Any] = {"images": 0, "failures": 0, "retries": 0, "units": 0}

    def commit(res: UnitResult) -> None:
        store.commit_unit(res.unit, res.seconds, res.failures)
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
            for u in pending:
                commit(probe.process(u))
        else:
            del probe  # free the driver's replica before actors load theirs
            _run_on_ray(cfg, pending, commit, address, state, _after_dispatch)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - state["t_start"]
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
    )
    store.set_attrs(last_run={"seconds": round(seconds, 3), "images": state["images"],
                              "images_per_second": round(summary.images_per_second, 3), "workers": workers,
                              "interrupted": interrupted, "total_seconds": round(time.perf_counter() - t0, 3),
                              "startup_seconds": round(state.get("startup_seconds", 0.0), 3)})
    return summary


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="attribute", dynamic_ncols=True, file=sys.stderr)


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": a fresh instance even when a `ray start` cluster runs on this host
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True,
                 object_store_memory=200 * 1024 * 1024, configure_logging=False)


def _run_on_ray(cfg: Config, pending: list[int], commit: Callable[[UnitResult], None], address: str | None,
                state: dict[str, Any], after_dispatch: Callable[[int, Any], None] | None) -> None:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    init_ray(address, num_cpus=None)
    gpus = cfg.run.gpus_per_worker
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    worker_cls = ray.remote(AttributionWorker).options(
        num_cpus=cfg.run.cpus_per_worker, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
    )
    cfg_dict = cfg.to_dict()
    threads = max(1, int(cfg.run.cpus_per_worker))
    actors = [worker_cls.remote(cfg_dict, threads) for _ in range(cfg.run.num_workers)]
    ray.get([a.pid.remote() for a in actors])  # surfaces model-loading errors before any unit
    state["startup_seconds"] = time.perf_counter() - state["t_start"]
    state["t_start"] = time.perf_counter()
    queue = deque(pending)
    attempts: dict[int, int] = {}
    in_flight: dict[Any, tuple[int, Any]] = {}  # ObjectRef -> (unit, actor)
    load = {i: 0 for i in range(len(actors))}

    def dispatch() -> None:
        for i, actor in enumerate(actors):
            while queue and load[i] < cfg.run.units_in_flight:
                unit = queue.popleft()
                ref = actor.process.remote(unit)
                in_flight[ref] = (unit, i)
                load[i] += 1
                if after_dispatch is not None:
                    after_dispatch(unit, actor)

    try:
        dispatch()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            unit, i = in_flight.pop(ref)
            load[i] -= 1
            try:
                res: UnitResult = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                # The actor died (crash, OOM kill, node loss). Ray restarts it; the unit goes back
                # in the queue. Rewriting a whole shard is idempotent, so at-least-once is safe.
                attempts[unit] = attempts.get(unit, 0) + 1
                state["retries"] += 1
                if attempts[unit] > cfg.run.max_retries:
                    raise JobError(f"unit {unit} lost its actor {attempts[unit]} times; last error: {exc}") from None
                queue.appendleft(unit)
            except RayTaskError as exc:
                # An exception in our own code is deterministic: retrying would fail again.
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise JobError(f"unit {unit} failed: {type(cause).__name__}: {cause}") from None
            else:
                commit(res)
            dispatch()
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


class AttributionWorker:
    """The Ray actor: one model replica, one ``UnitProcessor``."""

    def __init__(self, cfg_dict: dict[str, Any], threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        cfg = Config.from_dict(cfg_dict)
        self.processor = UnitProcessor(cfg)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def process(self, unit: int) -> UnitResult:
        res = self.processor.process(unit)
        res.worker = self.name
        return res

    def pid(self) -> int:
        return os.getpid()

