"""``distributed-attr report``: one self-contained HTML page (and a Markdown twin) for a store,
optionally with further stores of the same data beside it (another model, another architecture).

It gathers the job's facts from each store and every table (Parquet) and figure (PNG) that the
aggregation and evaluation jobs wrote into that store's outputs folder, so new analyses appear in
the report without changes here. Images are embedded as data URIs: the HTML file stands alone.
The page fits a 1,400-px window: figures shrink to the text width and wide tables scroll inside
their own box instead of widening the page.

Outputs that are not current (computed from a store that has changed since, or from some of its
units only with ``--partial``, or by an older version that recorded no store state) are named in a
banner at the top of the page and on the command's first line; a half-written output (an
``aggregates`` group without its completion marker, a set of tables whose switch did not finish)
is refused (``StoreError``: one ``error:`` line from the CLI). ``io/derived.py`` says how.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .inspect import describe_store
from .io.derived import OutputStatus, output_statuses, require_whole, warning_line
from .io.store import AttributionStore, outputs_dir

#: the order a reader wants: what the maps look like, their spectra, the filter's effect, the
#: rankings, then the details; anything else follows alphabetically
READING_ORDER = ("answer", "examples", "spectra", "filter_effect", "stage", "antialias", "rankings", "best_cutoffs",
                 "summary", "cutoff_curves", "cross_architecture")

#: what a reader needs to know to read a figure correctly, by file-name prefix
CAPTIONS = {
    "examples": "Each row is one image; each column one method's raw map, scaled per map. A map with "
                "negative values uses a blue-white-red scale symmetric around zero (white = 0). A map with "
                "no negative values (RISE, Sobol, Soundness, SquareGrad, VarGrad, the attention methods) "
                "runs from its own minimum (dark) to its maximum (yellow), so a map that sits on a large "
                "offset still shows its shape.",
    "spectra": "Mean radial power spectrum of the maps per method (log-log; frequencies in cycles/pixel).",
    "filter_effect": "Each method's mean spectrum after the low-pass at every cutoff of the sweep (black: "
                     "unfiltered), and the share of the maps' energy above the high-frequency cutoff against sigma.",
    "cutoff_curves": "Score against the FORGrad cutoff sigma (at the reference size) per method.",
}

STYLE = ("body{font-family:sans-serif;max-width:min(1200px,100% - 2em);margin:2em auto;color:#222;"
         "overflow-wrap:anywhere}"
         "table{border-collapse:collapse;font-size:12px;margin:0}td,th{border:1px solid #ccc;padding:3px 6px}"
         "th{background:#f0f0f0}.scroll{overflow-x:auto;max-width:100%;margin:1em 0}"
         "img{max-width:100%;height:auto;border:1px solid #ddd;margin:0.5em 0}"
         "figcaption{font-size:12px;color:#555;max-width:60em}figure{margin:1em 0}"
         "h2{border-bottom:1px solid #ccc}nav li{margin:0.2em 0}"
         ".banner{background:#fff3cd;border:2px solid #c98a00;color:#5c3d00;padding:0.6em 1em;margin:0 0 1em 0;"
         "font-weight:bold}.banner li{margin:0.2em 0}")


def _reading_order(path: Path) -> tuple[int, str]:
    for i, prefix in enumerate(READING_ORDER):
        if path.stem.startswith(prefix):
            return i, path.stem
    return len(READING_ORDER), path.stem


def _caption(path: Path) -> str:
    for prefix, text in CAPTIONS.items():
        if path.stem.startswith(prefix):
            return text
    return ""


def _tables(out: Path) -> Iterator[tuple[Path, Any, str]]:
    import pandas as pd

    for path in sorted(out.glob("*.parquet"), key=_reading_order):
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # a broken table must not hide the rest of the report
            yield path, None, str(exc)
            continue
        yield path, df, ""


@dataclass(frozen=True)
class _Section:
    """One store's part of the report: its facts, figures and tables."""

    store: str
    outputs: Path
    info: dict[str, Any]

    @classmethod
    def of(cls, store: str, out_dir: str | Path | None = None) -> "_Section":
        out = Path(out_dir) if out_dir else outputs_dir(store)
        return cls(store, out, describe_store(store, out_dir=out))

    @property
    def model(self) -> str:
        m = self.info.get("model") or {}
        return f"{m.get('kind')}:{m.get('name')}"

    @property
    def title(self) -> str:
        """The store's name and its model: two stores of one architecture stay apart."""
        return f"{Path(self.store.rstrip('/')).stem} ({self.model})"

    @property
    def anchor(self) -> str:
        return "store-" + "".join(c if c.isalnum() else "-" for c in Path(self.store).stem)

    def facts(self) -> list[tuple[str, str]]:
        info = self.info
        data = info.get("data") or {}
        lr = info.get("last_run") or {}
        return [
            ("store", info["store"]),
            ("dataset", f"{data.get('format')} at {data.get('path')}"),
            ("model", f"{self.model} (fingerprint {str(info['model_fingerprint'])[:12]})"),
            ("methods", ", ".join(info["methods"])),
            ("metrics", ", ".join(info["metrics"]) or "-"),
            ("evaluators", ", ".join(info["evaluators"]) or "-"),
            ("images", f"{info['images_ok']} ok of {info['images']} ({len(info['failures'])} failed)"),
            ("progress", f"{info['units_done']}/{info['units']} units"),
            ("throughput", f"{lr.get('images_per_second')} images/s with {lr.get('workers')} worker(s)" if lr else "-"),
        ]

    def figures(self) -> list[Path]:
        return sorted(self.outputs.glob("*.png"), key=_reading_order)


def _render(section: _Section, h: list[str], md: list[str], level: int, max_rows: int) -> None:
    hx, hy = f"h{level}", f"h{level + 1}"
    mx, my = "#" * level, "#" * (level + 1)
    h.append(f"<{hx}>Job</{hx}><table>")
    md += [f"{mx} Job", "", "| | |", "|---|---|"]
    for k, v in section.facts():
        h.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>")
        md.append(f"| {k} | {v} |")
    h.append("</table>")
    _render_choices_and_degenerate(section.info, h, md, hy, my)
    failures = section.info["failures"]
    if failures:
        h.append(f"<{hy}>Failed images</{hy}><ul>")
        md += ["", f"{my} Failed images", ""]
        for idx, why in sorted(failures.items())[:20]:
            h.append(f"<li>{idx}: {html.escape(why)}</li>")
            md.append(f"- {idx}: {why}")
        h.append("</ul>")
    h.append(f"<{hx}>Figures</{hx}>")
    md += ["", f"{mx} Figures", ""]
    for fig in section.figures():
        data = base64.b64encode(fig.read_bytes()).decode()
        title, caption = fig.stem.replace("_", " "), _caption(fig)
        h.append(f"<figure><{hy}>{html.escape(title)}</{hy}><img src='data:image/png;base64,{data}' "
                 f"alt='{html.escape(title)}'>" + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "")
                 + "</figure>")
        md.append(f"{my} {title}\n\n![{fig.stem}]({fig.resolve()})\n" + (f"\n{caption}\n" if caption else ""))
    h.append(f"<{hx}>Tables</{hx}>")
    md += [f"{mx} Tables", ""]
    for path, df, err in _tables(section.outputs):
        title = path.stem.replace("_", " ")
        if df is None:
            h.append(f"<{hy}>{html.escape(title)}</{hy}><p>unreadable: {html.escape(err)}</p>")
            continue
        shown = df.head(max_rows)
        note = f" (first {max_rows} of {len(df)} rows; full table: {path.name})" if len(df) > max_rows else ""
        h.append(f"<{hy}>{html.escape(title)}</{hy}><p>{html.escape(note)}</p>")
        h.append("<div class='scroll'>" + shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0) + "</div>")
        table = shown.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else shown.to_string(index=False)
        md.append(f"{my} {title}{note}\n\n{table}\n")


def _render_choices_and_degenerate(info: dict[str, Any], h: list[str], md: list[str], hy: str, my: str) -> None:
    """The job's warnings, what its methods chose for the user (CAM layers, canonizer, token
    grids) and, per method, its degenerate maps (all zero, constant, non-finite)."""
    warnings = info.get("warnings") or []
    if warnings:
        h.append(f"<{hy}>Warnings</{hy}><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
        md += ["", f"{my} Warnings", ""] + [f"- {w}" for w in warnings]
    described = (info.get("resolved") or {}).get("described") or {}
    if described:
        h.append(f"<{hy}>Choices made for you</{hy}><ul>"
                 + "".join(f"<li>{html.escape(line)}</li>" for line in described.values()) + "</ul>")
        md += ["", f"{my} Choices made for you", ""] + [f"- {line}" for line in described.values()]
    counts = info.get("degenerate") or {}
    h.append(f"<{hy}>Degenerate maps</{hy}>")
    md += ["", f"{my} Degenerate maps", ""]
    if not counts:
        h.append("<p>not recorded (a store made before schema 1.3)</p>")
        md.append("not recorded (a store made before schema 1.3)")
        return
    head = ("method", "usable maps", "all-zero", "constant", "non-finite")
    rows = [(m, c.get("maps", 0), c.get("all_zero", 0), c.get("constant", 0), c.get("non_finite", 0))
            for m, c in counts.items()]
    h.append("<div class='scroll'><table><tr>" + "".join(f"<th>{k}</th>" for k in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
             + "</table></div>")
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    md.append("")


def markdown_to_html(text: str) -> str:
    """The Markdown subset the product writes (``#`` headings, ``-`` lists nested by two spaces,
    ``**bold**``, paragraphs) as HTML; headings move one level down, under the report's title."""
    import re

    out: list[str] = []
    depth = 0
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        level = (len(line) - len(stripped)) // 2 + 1 if stripped.startswith("- ") else 0
        while depth > level:
            out.append("</ul>")
            depth -= 1
        body = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(stripped[2:] if level else stripped))
        if level:
            while depth < level:
                out.append("<ul>")
                depth += 1
            out.append(f"<li>{body}</li>")
        elif stripped.startswith("#"):
            n = min(6, len(stripped) - len(stripped.lstrip("#")) + 1)
            out.append(f"<h{n}>{re.sub(r'^#+ *', '', body)}</h{n}>")
        elif stripped:
            out.append(f"<p>{body}</p>")
    out += ["</ul>"] * depth
    return "\n".join(out)


def _statuses(store: str, out_dir: str | Path | None) -> list[OutputStatus]:
    """How a store's derived outputs (its ``aggregates`` group, the tables in its outputs folder)
    stand against the store now."""
    return output_statuses(AttributionStore.open(store, mode="r"), Path(out_dir) if out_dir else outputs_dir(store))


def _all_statuses(store: str, out_dir: str | Path | None, companions: Sequence[str]) -> list[OutputStatus]:
    found = _statuses(store, out_dir)
    for c in companions:
        found += _statuses(c, None)
    return found


def output_states(store: str, out_dir: str | None = None, companions: Sequence[str] = ()) -> list[OutputStatus]:
    """The state of every output a report of ``store`` (and ``companions``) shows."""
    return _all_statuses(store, out_dir, companions)


def report_warnings(store: str, out_dir: str | None = None, companions: Sequence[str] = ()) -> str | None:
    """The line ``report`` prints first when an output it shows is out of date, partial or of
    unknown state (None when every one is current)."""
    return warning_line(_all_statuses(store, out_dir, companions))


def _banner(statuses: list[OutputStatus]) -> tuple[str, list[str]]:
    """The warning banner at the top of the page, as HTML and Markdown ("" and [] when none)."""
    problems = [s.message for s in statuses if s.state != "current"]
    if not problems:
        return "", []
    html_banner = ("<div class='banner' role='alert'>Some results below are not current:<ul>"
                   + "".join(f"<li>{html.escape(m)}</li>" for m in problems) + "</ul></div>")
    return html_banner, ["> **Some results below are not current:**", ">"] + [f"> - {m}" for m in problems] + [""]


def write_report(store: str, out_dir: str | None = None, max_rows: int = 60,
                 companions: Sequence[str] = (), preface: str = "",
                 statuses: list[OutputStatus] | None = None) -> Path:
    """Write ``report.html`` and ``report.md`` into the outputs folder and return the HTML path.

    ``companions``: further stores of the same data (another model, say a transformer beside a
    CNN), each shown as its own section after the main store, with the figures and tables of its
    own outputs folder (run ``aggregate``/``evaluate`` on it first to have them).
    ``preface``: Markdown shown first (a study's conclusions, e.g. ``benchmark run``'s answer).
    ``statuses``: the outputs' states as the caller found them (``output_states``), so that what
    it prints and the page's banner say the same; found here when None.
    """
    main = _Section.of(store, out_dir)
    others = [_Section.of(c) for c in companions]
    if statuses is None:
        statuses = _all_statuses(store, out_dir, companions)
    require_whole(statuses)  # a half-written output is refused, never shown
    banner, banner_md = _banner(statuses)
    out = main.outputs
    out.mkdir(parents=True, exist_ok=True)
    h = ["<!doctype html><html><head><meta charset='utf-8'>"
         "<meta name='viewport' content='width=device-width, initial-scale=1'>"
         f"<title>distributed_attr report</title><style>{STYLE}</style></head><body>",
         *([banner] if banner else []),
         "<h1>Attribution report</h1>"]
    md = [*banner_md, "# Attribution report", ""]
    if preface:
        h.append(markdown_to_html(preface))
        md += ["#" + line if line.startswith("#") else line for line in preface.splitlines()] + [""]
    if others:
        h.append("<nav><ul>" + "".join(f"<li><a href='#{s.anchor}'>{html.escape(s.title)}</a>: {html.escape(s.store)}</li>"
                                       for s in (main, *others)) + "</ul></nav>")
        md += [f"- {s.title}: {s.store}" for s in (main, *others)] + [""]
        for s in (main, *others):
            h.append(f"<h2 id='{s.anchor}'>{html.escape(s.title)}</h2>")
            md += [f"## {s.title}", ""]
            _render(s, h, md, 3, max_rows)
    else:
        _render(main, h, md, 2, max_rows)
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
