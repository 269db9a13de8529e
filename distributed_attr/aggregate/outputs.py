"""What the driver writes: the store's ``aggregates/`` group, Parquet tables and PNG plots."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..io.derived import GroupAside, title_note, write_parquet
from ..io.store import Keys
from .plan import ReadPlan
from .results import Results, ScopeResult


def write_aggregates_group(store: str, plan: ReadPlan, results: Results, done: np.ndarray,
                           record: dict | None = None) -> GroupAside:
    """The ``aggregates/`` group, rewritten as a whole by the driver (the single writer), aside:
    the returned ``GroupAside`` writes its attributes last and puts it in place on ``commit()``
    (``io/derived.py``), so that no reader sees half of it; ``abort()`` drops it. ``record``: the store state the aggregates were computed from
    (``StoreState.record``), written into the group's attributes with ``complete: true`` last.

    The group and its coordinates are paths of ``io.store.Keys`` (``AGGREGATES``,
    ``AGGREGATES_CUTOFF``, ``AGGREGATES_FREQUENCY``, ``aggregates(method)``); the arrays inside
    each method's group are named here, and docs/spectra.md lists them: ``class``, then for the
    prefix "" (all images) and "class_" (a leading ``class`` dimension) ``n_images``,
    ``spectrum_{mean,std,ci95}``, ``slope``, ``hf_fraction``, ``<quantity>_{mean,std,ci95}`` per
    ``ScopeResult.PER_IMAGE`` quantity, and ``map_{mean,std}`` when the maps were read."""
    aside = GroupAside(store, Keys.AGGREGATES, plan.storage_options)
    try:
        _fill_aggregates(aside.group, plan, results)
    except BaseException:
        aside.abort()
        raise
    aside.attrs = dict(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        units_aggregated=int(done.size),
        hf_cutoff=plan.hf_cutoff,
        methods=list(results),
        spectra_source="store" if plan.have_spectra else "computed from maps",
        **(record or {}),
    )
    return aside


def _inside(path: str) -> str:
    """A path of ``Keys`` under ``aggregates/``, relative to that group."""
    return path[len(Keys.AGGREGATES) + 1:]


def _fill_aggregates(agg, plan: ReadPlan, results: Results) -> None:
    cutoffs = np.asarray(plan.cutoffs, dtype=np.float64)
    freqs = np.asarray(plan.frequencies, dtype=np.float64)
    agg.create_array(_inside(Keys.AGGREGATES_CUTOFF), data=cutoffs, dimension_names=["cutoff"],
                     attributes={"units": "cycles per image; inf = unfiltered"})
    agg.create_array(_inside(Keys.AGGREGATES_FREQUENCY), data=freqs, dimension_names=["frequency"],
                     attributes={"units": "cycles per pixel"})

    def put(group, name, data, dims, **attrs):
        group.create_array(name, data=np.asarray(data), dimension_names=list(dims), attributes=attrs)

    for m, scopes in results.items():
        g = agg.create_group(_inside(Keys.aggregates(m)))
        classes = sorted(k for k in scopes if k != "all")
        put(g, "class", np.asarray(classes, dtype=np.int64), ["class"], meaning="target class the maps explain")
        for prefix, keys, lead in (("", ["all"], []), ("class_", classes, ["class"])):
            def stack(fn, dtype=np.float64):
                arr = np.stack([np.asarray(fn(scopes[k]), dtype=dtype) for k in keys]) if keys else None
                return arr if prefix else (arr[0] if arr is not None else None)

            if not keys:
                continue
            put(g, f"{prefix}n_images", stack(lambda s: s.n, np.int64), lead)
            put(g, f"{prefix}spectrum_mean", stack(lambda s: s.spectrum.mean), lead + ["cutoff", "frequency"])
            put(g, f"{prefix}spectrum_std", stack(lambda s: s.spectrum.std), lead + ["cutoff", "frequency"])
            put(g, f"{prefix}spectrum_ci95", stack(lambda s: s.spectrum.ci95), lead + ["cutoff", "frequency"],
                meaning="half-width of the normal 95% CI of the mean: 1.96 std / sqrt(n)")
            put(g, f"{prefix}slope", stack(lambda s: s.slope), lead + ["cutoff"],
                meaning="log-log slope of the mean spectrum (frequency > 0)")
            put(g, f"{prefix}hf_fraction", stack(lambda s: s.hf_fraction), lead + ["cutoff"],
                meaning=f"non-DC energy above {plan.hf_cutoff} cycles/pixel in the mean spectrum")
            for q in ScopeResult.PER_IMAGE:
                if all(getattr(scopes[k], q) is not None for k in keys):
                    for stat in ("mean", "std", "ci95"):
                        put(g, f"{prefix}{q}_{stat}", stack(lambda s: getattr(getattr(s, q), stat)), lead + ["cutoff"])
            if all(scopes[k].map is not None for k in keys):
                put(g, f"{prefix}map_mean", stack(lambda s: s.map.mean, np.float32), lead + ["y", "x"])
                put(g, f"{prefix}map_std", stack(lambda s: s.map.std, np.float32), lead + ["y", "x"])


def write_tables(out: Path, plan: ReadPlan, results: Results, record: dict | None = None) -> dict[str, str]:
    """``spectra.parquet`` (a row per method, scope, cutoff and frequency) and ``summary.parquet``
    (a row per method, scope and cutoff), built column-wise: with 1,000 classes that is ~0.7 M
    spectrum rows, which row-by-row Python would take seconds to assemble. ``record``: the store
    state, in each table's schema metadata (``io.derived.PARQUET_KEY``)."""
    import pyarrow as pa

    image_size = min(plan.image_shape[1:])
    cutoffs = np.asarray(plan.cutoffs, dtype=np.float64)
    freqs = np.asarray(plan.frequencies, dtype=np.float64)
    n_cut, n_freq = cutoffs.size, freqs.size
    sigma224 = cutoffs * 224 / image_size
    extra = [(q, stat) for q in ScopeResult.PER_IMAGE for stat in ("mean", "std", "ci95")]
    spectra_cols: dict[str, list] = {}
    summary_cols: dict[str, list] = {}

    def add(cols: dict, name: str, values, mask=None) -> None:
        cols.setdefault(name, []).append((np.asarray(values), mask))

    for m, scopes in results.items():
        for key, s in scopes.items():
            scope, cls = ("all", None) if key == "all" else ("class", int(key))
            spec = s.spectrum
            rows = n_cut * n_freq
            for cols, k in ((spectra_cols, rows), (summary_cols, n_cut)):
                add(cols, "method", np.full(k, m, dtype=object))
                add(cols, "scope", np.full(k, scope, dtype=object))
                add(cols, "class", np.full(k, -1 if cls is None else cls, dtype=np.int64),
                    np.full(k, cls is None))
            add(spectra_cols, "cutoff", np.repeat(cutoffs, n_freq))
            add(spectra_cols, "sigma_at_224", np.repeat(sigma224, n_freq))
            add(spectra_cols, "frequency", np.tile(freqs, n_cut))
            mean, ci = spec.mean.ravel(), spec.ci95.ravel()
            add(spectra_cols, "mean", mean)
            add(spectra_cols, "std", spec.std.ravel())
            add(spectra_cols, "ci95", ci)
            add(spectra_cols, "lower", mean - ci)
            add(spectra_cols, "upper", mean + ci)
            add(spectra_cols, "n", spec.count.ravel().astype(np.int64))
            add(summary_cols, "cutoff", cutoffs)
            add(summary_cols, "sigma_at_224", sigma224)
            add(summary_cols, "n", np.full(n_cut, s.n, dtype=np.int64))
            for col in ("slope", "intercept", "hf_fraction"):
                add(summary_cols, col, np.asarray(getattr(s, col), dtype=np.float64))
            for q, stat in extra:
                moments = getattr(s, q)
                present = moments is not None
                add(summary_cols, f"{q}_{stat}",
                    np.asarray(getattr(moments, stat), dtype=np.float64) if present else np.full(n_cut, np.nan),
                    None if present else np.ones(n_cut, dtype=bool))

    def table(cols: dict) -> "pa.Table":
        arrays = {}
        for name, parts in cols.items():
            values = np.concatenate([v for v, _ in parts])
            masks = [mk if mk is not None else np.zeros(len(v), dtype=bool) for v, mk in parts]
            mask = np.concatenate(masks) if any(mk is not None for _, mk in parts) else None
            arrays[name] = pa.array(values, mask=mask) if mask is not None else pa.array(values)
        return pa.table(arrays)

    paths = {"spectra": str(out / "spectra.parquet"), "summary": str(out / "summary.parquet")}
    write_parquet(table(spectra_cols), Path(paths["spectra"]), record or {})
    write_parquet(table(summary_cols), Path(paths["summary"]), record or {})
    return paths


def _positive_band(mean: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 95 % band clipped to positive values for log axes."""
    floor = np.nanmin(np.where(mean > 0, mean, np.inf)) * 1e-3 if np.any(mean > 0) else 1e-12
    return np.maximum(mean - ci, floor), mean + ci


def write_plots(out: Path, plan: ReadPlan, results: Results, record: dict | None = None) -> list[str]:
    """``spectra.png`` and ``filter_effect.png``; a partial aggregate (``record``) says so in
    their titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    freqs = np.asarray(plan.frequencies)
    pos = freqs > 0
    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    # tab10 repeats after ten methods: tab20 plus line styles keeps 13+ methods apart
    palette = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    for i, (m, scopes) in enumerate(results.items()):
        s = scopes["all"]
        mean, ci = s.spectrum.mean[0], s.spectrum.ci95[0]
        lo, hi = _positive_band(mean[pos], ci[pos])
        line, = ax.loglog(freqs[pos], mean[pos], color=palette[(2 * i) % 20 + (i // 10) % 2],
                          linestyle=styles[(i // 20) % 4], label=f"{m} (slope {s.slope[0]:.2f}, n={s.n})")
        ax.fill_between(freqs[pos], lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(plan.hf_cutoff, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("spatial frequency (cycles per pixel)")
    ax.set_ylabel("power |F|² / (H W)")
    note = title_note(record or {})
    ax.set_title("Mean radial power spectrum of the maps (95% CI band)" + note)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside, not over, the curves
    paths.append(str(out / "spectra.png"))
    fig.savefig(paths[-1], dpi=130, bbox_inches="tight")
    plt.close(fig)

    methods = list(results)
    # one panel per method, the high-frequency fraction against sigma, and one that holds the
    # legends: inside the small panels they covered the curves
    panels = len(methods) + 2
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    image_size = min(plan.image_shape[1:])
    finite = [k for k, c in enumerate(plan.cutoffs) if not math.isinf(c)]
    for ax, m in zip(axes.ravel(), methods):
        s = results[m]["all"]
        top = np.nanmax(s.spectrum.mean[:, pos]) if np.any(pos) else 1.0
        for k, c in enumerate(plan.cutoffs):
            mean = s.spectrum.mean[k]
            label = "unfiltered" if math.isinf(c) else f"σ={c:.3g} (≙{c * 224 / image_size:.0f} @224)"
            color = "black" if math.isinf(c) else cmap(k / max(1, len(plan.cutoffs) - 1))
            ok = pos & (mean > 0)
            ax.loglog(freqs[ok], mean[ok], color=color, linewidth=1.4 if math.isinf(c) else 1.0, label=label)
        if np.isfinite(top) and top > 0:
            ax.set_ylim(top * 1e-7, top * 3)  # filtered-out bins sit at rounding level: not informative
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("cycles per pixel")
        ax.set_ylabel("power")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cutoff_handles = axes.ravel()[0].get_legend_handles_labels()
    ax = axes.ravel()[len(methods)]
    sig = np.asarray([plan.cutoffs[k] * 224 / image_size for k in finite])
    for i, m in enumerate(methods):
        s = results[m]["all"]
        color = palette[(2 * i) % 20 + (i // 10) % 2]
        ax.semilogx(sig, s.hf_fraction[finite], marker="o", markersize=3, label=m, color=color,
                    linestyle=styles[(i // 20) % 4])
        ax.axhline(s.hf_fraction[0], linestyle=":", linewidth=0.8, color=color)
    if len(sig):
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(np.unique(sig)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{v:.4g}" for v in np.unique(sig)]))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("σ at 224 px (cycles per image)")
    ax.set_ylabel(f"energy share above {plan.hf_cutoff} c/px")
    ax.set_title("high-frequency fraction (dotted: unfiltered)", fontsize=10)
    method_handles = ax.get_legend_handles_labels()
    legend_ax = axes.ravel()[len(methods) + 1]
    # side by side, each from the top: stacked, a long sweep's legend ran into the methods'
    first = legend_ax.legend(*cutoff_handles, loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=7,
                             title="spectrum panels", title_fontsize=8, frameon=False)
    legend_ax.add_artist(first)
    legend_ax.legend(*method_handles, loc="upper left", bbox_to_anchor=(0.55, 1.0), fontsize=7,
                     title="high-frequency panel", title_fontsize=8, frameon=False)
    for ax in axes.ravel()[len(methods) + 1:]:
        ax.axis("off")
    fig.suptitle(f"Low-pass filter ({plan.filter_kind}) effect on the mean spectrum{note}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the panels
    paths.append(str(out / "filter_effect.png"))
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths
