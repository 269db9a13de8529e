"""``distributed-attr report``: one self-contained HTML page (and a Markdown twin) for a store.

It gathers the job's facts from the store and every table (Parquet) and figure (PNG) that the
aggregation and evaluation jobs wrote into the store's outputs folder, so new analyses appear in
the report without changes here. Images are embedded as data URIs: the HTML file stands alone.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .inspect import describe_store
from .io.store import outputs_dir


#: the order a reader wants: what the maps look like, their spectra, the filter's effect, the
#: rankings, then the details; anything else follows alphabetically
READING_ORDER = ("examples", "spectra", "filter_effect", "stage", "antialias", "rankings", "best_cutoffs",
                 "summary", "cutoff_curves", "cross_architecture")


def _reading_order(path: Path) -> tuple[int, str]:
    for i, prefix in enumerate(READING_ORDER):
        if path.stem.startswith(prefix):
            return i, path.stem
    return len(READING_ORDER), path.stem


def _tables(out: Path):
    import pandas as pd

    for path in sorted(out.glob("*.parquet"), key=_reading_order):
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # a broken table must not hide the rest of the report
            yield path, None, str(exc)
            continue
        yield path, df, ""


def write_report(store: str, out_dir: str | None = None, max_rows: int = 60) -> Path:
    """Write ``report.html`` and ``report.md`` into the outputs folder and return the HTML path."""
    info = describe_store(store)
    out = Path(out_dir) if out_dir else outputs_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    examples = out.parent / "examples.png"  # the demo's picture of the images, beside the outputs
    figures = sorted(out.glob("*.png"), key=_reading_order)
    if examples.exists():
        figures.insert(0, examples)
    lr = info.get("last_run") or {}
    facts = [
        ("store", info["store"]),
        ("dataset", f"{(info.get('data') or {}).get('format')} at {(info.get('data') or {}).get('path')}"),
        ("model", f"{(info.get('model') or {}).get('kind')}:{(info.get('model') or {}).get('name')}"
                  f" (fingerprint {str(info['model_fingerprint'])[:12]})"),
        ("methods", ", ".join(info["methods"])),
        ("metrics", ", ".join(info["metrics"]) or "-"),
        ("evaluators", ", ".join(info["evaluators"]) or "-"),
        ("images", f"{info['images_ok']} ok of {info['images']} ({len(info['failures'])} failed)"),
        ("progress", f"{info['units_done']}/{info['units']} units"),
        ("throughput", f"{lr.get('images_per_second')} images/s with {lr.get('workers')} worker(s)" if lr else "-"),
    ]
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>distributed_attr report</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
         "th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}"
         "h2{border-bottom:1px solid #ccc}</style></head><body>",
         "<h1>Attribution report</h1>", "<h2>Job</h2><table>"]
    md = ["# Attribution report", "", "## Job", "", "| | |", "|---|---|"]
    for k, v in facts:
        h.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>")
        md.append(f"| {k} | {v} |")
    h.append("</table>")
    if info["failures"]:
        h.append("<h3>Failed images</h3><ul>")
        md += ["", "### Failed images", ""]
        for idx, why in sorted(info["failures"].items())[:20]:
            h.append(f"<li>{idx}: {html.escape(why)}</li>")
            md.append(f"- {idx}: {why}")
        h.append("</ul>")
    h.append("<h2>Figures</h2>")
    md += ["", "## Figures", ""]
    for fig in figures:
        data = base64.b64encode(fig.read_bytes()).decode()
        h.append(f"<h3>{html.escape(fig.stem.replace('_', ' '))}</h3><img src='data:image/png;base64,{data}'>")
        md.append(f"### {fig.stem.replace('_', ' ')}\n\n![{fig.stem}]({fig.resolve()})\n")
    h.append("<h2>Tables</h2>")
    md += ["## Tables", ""]
    for path, df, err in _tables(out):
        title = path.stem.replace("_", " ")
        if df is None:
            h.append(f"<h3>{html.escape(title)}</h3><p>unreadable: {html.escape(err)}</p>")
            continue
        shown = df.head(max_rows)
        note = f" (first {max_rows} of {len(df)} rows; full table: {path.name})" if len(df) > max_rows else ""
        h.append(f"<h3>{html.escape(title)}</h3><p>{html.escape(note)}</p>")
        h.append(shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0))
        md.append(f"### {title}{note}\n\n{shown.to_markdown(index=False, floatfmt='.4g') if _has_tabulate() else shown.to_string(index=False)}\n")
    h.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(h))
    (out / "report.md").write_text("\n".join(md) + "\n")
    return html_path


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
