"""PNG figures for the evaluation outputs (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_cutoff_curves(curves: pd.DataFrame, best: pd.DataFrame, metric: str, higher_is_better: bool,
                       path: Path, note: str = "") -> Path:
    """Mean score against cutoff (log axis) per method with its 95% band; the unfiltered mean
    as a dashed line of the same colour, the validation-chosen cutoff as a star. ``note``: added
    to the title (a partial evaluation's " [PARTIAL: ...]")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # tab10 repeats after ten methods (saliency and RISE shared a colour): tab20 and line styles
    palette = plt.get_cmap("tab20").colors
    groups = list(curves.groupby("method", sort=False))
    for i, (method, rows) in enumerate(groups):
        color = palette[(2 * i) % 20 + (i // 10) % 2]
        style = ("-", "--")[(i // 20) % 2]
        finite = rows[np.isfinite(rows["cutoff"])].sort_values("cutoff")
        unf = rows[~np.isfinite(rows["cutoff"])]
        if len(finite):
            ax.plot(finite["cutoff"], finite["mean"], marker="o", ls=style, ms=3, color=color, label=method)
            # a dozen overlapping bands turn into one brown blur at a higher opacity
            ax.fill_between(finite["cutoff"], finite["ci_low"], finite["ci_high"], color=color,
                            alpha=0.15 if len(groups) <= 4 else 0.06, linewidth=0)
        if len(unf):
            ax.axhline(float(unf["mean"].iloc[0]), color=color, ls=":", lw=1)
        b = best[best["method"] == method]
        if len(b):
            c = float(b["best_cutoff"].iloc[0])
            if math.isfinite(c):
                y = float(rows.loc[np.isclose(rows["cutoff"], c), "mean"].iloc[0])
                ax.plot([c], [y], "*", ms=12, color=color, mec="k")
    finite_cutoffs = np.unique(curves["cutoff"][np.isfinite(curves["cutoff"]) & (curves["cutoff"] > 0)])
    if len(finite_cutoffs):
        import matplotlib.ticker

        ax.set_xscale("log")
        # ticks at the swept cutoffs themselves, not at powers of ten that may not be on the axis
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(finite_cutoffs))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{c:.3g}" for c in finite_cutoffs]))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("low-pass cutoff (cycles per image); dotted: unfiltered; star: chosen cutoff")
    ax.set_ylabel(f"mean {metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(f"{metric}: score against filter cutoff{note}")
    # beside the axes, never over the curves ("best" still covered the bands of 13 methods)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_rank_table(ranks: pd.DataFrame, path: Path, note: str = "") -> Path:
    """Heat map of ranks: methods x (metric, condition), rank and 95% interval in each cell."""
    plt = _pyplot()
    methods = list(dict.fromkeys(ranks["method"]))
    cols = list(dict.fromkeys(zip(ranks["metric"], ranks["condition"])))
    grid = np.full((len(methods), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in methods]
    for r in ranks.itertuples():
        i, j = methods.index(r.method), cols.index((r.metric, r.condition))
        grid[i, j] = r.rank
        text[i][j] = f"{r.rank:g}\n[{r.rank_ci_low:g}, {r.rank_ci_high:g}]"
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 0.9 + 0.6 * len(methods)))
    ax.imshow(grid, cmap="viridis_r", aspect="auto", vmin=1, vmax=max(1, len(methods)))
    for i in range(len(methods)):
        for j in range(len(cols)):
            light = np.isfinite(grid[i, j]) and grid[i, j] <= (1 + len(methods)) / 2  # yellow end of viridis_r
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7, color="k" if light else "w")
    ax.set_xticks(range(len(cols)), [f"{m}\n{c}" for m, c in cols], fontsize=7, rotation=45, ha="right")
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_title(f"rank (1 = best) with bootstrap 95% interval{note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cross_architecture(matrix: pd.DataFrame, path: Path, note: str = "") -> Path:
    """One heat map per (method, keep level): explaining model x evaluator accuracy."""
    plt = _pyplot()
    panels = list(dict.fromkeys(zip(matrix["method"], matrix["keep"])))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (method, keep) in zip(axes.ravel(), panels):
        sub = matrix[(matrix["method"] == method) & (matrix["keep"] == keep)]
        ex, ev = list(dict.fromkeys(sub["explainer"])), list(dict.fromkeys(sub["evaluator"]))
        grid = np.full((len(ex), len(ev)), np.nan)
        for r in sub.itertuples():
            grid[ex.index(r.explainer), ev.index(r.evaluator)] = r.accuracy
        ax.imshow(grid, vmin=0, vmax=1, cmap="magma")
        for i in range(len(ex)):
            for j in range(len(ev)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="c")
        ax.set_xticks(range(len(ev)), ev, fontsize=7, rotation=30)
        ax.set_yticks(range(len(ex)), ex, fontsize=7)
        ax.set_title(f"{method}, keep {keep:g}", fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"feature detection accuracy: explaining model (rows) x evaluator (columns){note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
