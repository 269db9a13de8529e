"""``distributed-attr inspect``: what a store holds, how far its job got, which images failed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io.derived import output_statuses, store_state, warning_line
from .io.lease import StoreLease, lease_info
from .io.store import AttributionStore, Keys, outputs_dir, walk_arrays


def describe_store(path: str, verify: bool = False, out_dir: str | Path | None = None) -> dict[str, Any]:
    """What a store holds and how far its job got. ``verify``: read back every done unit's shard
    of every per-image array; units with a missing or unreadable shard are marked not done (with
    the reason, in ``invalid_units``), so that ``run --resume`` recomputes them.
    ``outputs`` says how each derived output (the ``aggregates`` group, the aggregate and
    evaluation tables in ``out_dir``, default the store's outputs folder) stands against the
    store now, and ``warning`` is the line to show first when any is not current."""
    store = AttributionStore.open(path, mode="r")
    invalid: dict[int, str] | None = None
    if verify:
        invalid = store.verify(decode=True)
        if invalid:
            # Marking writes the store's bookkeeping: only as its one driver (refused while a job runs).
            with StoreLease.acquire(path):
                store = AttributionStore.open(path, mode="r+")
                store.mark_not_done(invalid)
    a = store.attrs
    generation = store.generation  # before the done flags (io/derived.py)
    done = store.done_units()
    state = store_state(store, path, done=done)
    outputs = output_statuses(store, Path(out_dir) if out_dir else outputs_dir(path), state)
    seconds = store.group[Keys.UNITS_SECONDS][:]
    arrays = {}
    for name, arr in sorted(walk_arrays(store.group, skip_unreadable=True)):
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                        "dims": list(arr.metadata.dimension_names or [])}
    images_done = sum(store.unit_range(int(u))[1] - store.unit_range(int(u))[0] for u in done)
    return {
        "store": path,
        "warning": warning_line(outputs),
        "schema_version": a.get("schema_version"),
        "generation": generation,
        "created": a.get("created"),
        "images": store.n_images,
        "units": store.n_units,
        "units_done": int(len(done)),
        "images_done": int(images_done),
        "images_ok": int(store.usable().sum()),
        "complete": bool(len(done) == store.n_units),
        "methods": a.get("methods", []),
        "metrics": a.get("metrics", []),
        "evaluators": a.get("evaluators", []),
        "model": a.get("config", {}).get("model"),
        "data": a.get("config", {}).get("data"),
        "config_hash": a.get("config_hash"),
        "model_fingerprint": a.get("model_fingerprint"),
        "unit_seconds_mean": float(np.nanmean(seconds)) if np.isfinite(seconds).any() else None,
        "last_run": a.get("last_run"),
        "failures": store.failures(),
        "verified": verify,
        "invalid_units": invalid if invalid is not None else {},
        "lease": (lambda li: li and {"host": li.host, "pid": li.pid, "started": li.started, "alive": li.alive()})(
            lease_info(path)),
        "outputs": [o.to_dict() for o in outputs],
        "arrays": arrays,
        # (1.3) per method: maps, degenerate, all_zero, constant, non_finite over the usable images
        "degenerate": store.degenerate_counts(),
        # (1.3) what the methods chose for the user, and what the job warned about
        "resolved": a.get("resolved") or {},
        "warnings": [w.get("message", str(w)) if isinstance(w, dict) else str(w) for w in a.get("warnings") or []],
    }


def degenerate_lines(info: dict[str, Any]) -> list[str]:
    """``inspect``'s lines on the methods' choices, degenerate maps and the job's warnings."""
    lines = []
    for i, line in enumerate((info.get("resolved") or {}).get("described", {}).values()):
        lines.append(f"{'choices' if i == 0 else '':11s} {line}")
    counts = info.get("degenerate") or {}
    if not counts:
        lines.append("degenerate  not recorded (a store made before schema 1.3)")
    elif not any(c.get("degenerate") for c in counts.values()):
        lines.append("degenerate  none (0 all-zero, 0 constant, 0 non-finite maps, every method)")
    else:
        for i, (method, c) in enumerate(counts.items()):
            lines.append(f"{'degenerate' if i == 0 else '':11s} {method}: {c.get('all_zero', 0)} all-zero, "
                         f"{c.get('constant', 0)} constant, {c.get('non_finite', 0)} non-finite of "
                         f"{c.get('maps', 0)} maps")
    lines += [f"warning     {w}" for w in info.get("warnings") or []]
    return lines


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"store       {info['store']} (schema {info['schema_version']}, created {info['created']})",
        f"progress    {info['units_done']}/{info['units']} units, {info['images_done']}/{info['images']} images"
        f" ({'complete' if info['complete'] else 'incomplete: rerun with --resume'})",
        f"ok images   {info['images_ok']}   failed: {len(info['failures'])}",
        f"generation  {info.get('generation', 0)} (advanced by every commit and every --verify invalidation)",
        f"model       {info['model']}",
        f"            fingerprint {str(info['model_fingerprint'])[:16]}  config {info['config_hash']}",
        f"data        {info['data'].get('format')} at {info['data'].get('path')}" if info.get("data") else "data        ?",
        f"methods     {', '.join(info['methods'])}",
        f"metrics     {', '.join(info['metrics']) or '-'}   evaluators: {', '.join(info['evaluators']) or '-'}",
    ]
    for o in info.get("outputs") or []:
        lines.append(f"outputs     {o['what']} ({o['where']}): {o['state']}")
    lines += degenerate_lines(info)
    if info.get("warning"):
        lines.insert(0, info["warning"])
    if info.get("lease"):
        le = info["lease"]
        lines.append(f"driver      pid {le['pid']} on {le['host']} since {le['started']}"
                     f" ({'running' if le['alive'] else 'gone; the next run takes the store over'})")
    if info.get("verified"):
        bad = info.get("invalid_units") or {}
        lines.append(f"verified    {'every done unit reads back' if not bad else f'{len(bad)} unit(s) damaged, now marked not done: rerun with --resume'}")
        for u, why in list(bad.items())[:20]:
            lines.append(f"  unit {u}: {why}")
    else:
        lines.append("verified    no (inspect --verify reads back every done unit's shards)")
    if info.get("last_run"):
        lr = info["last_run"]
        lines.append(f"last run    {lr.get('images')} images in {lr.get('seconds')} s = {lr.get('images_per_second')} images/s"
                     f" with {lr.get('workers')} worker(s)")
    lines.append("arrays:")
    for name, a in info["arrays"].items():
        lines.append(f"  {name:40s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} ({', '.join(a['dims'])})")
    if info["failures"]:
        lines.append("failed images:")
        for idx, why in sorted(info["failures"].items())[:50]:
            lines.append(f"  {idx}: {why}")
        if len(info["failures"]) > 50:
            lines.append(f"  ... and {len(info['failures']) - 50} more (--json lists all)")
    return "\n".join(lines)
