"""``distributed-attr benchmark run``: the FORGrad question on the generated benchmark, answered
with confidence intervals.

For each of the two models (plain and anti-aliased downsampling) one attribution job over the
test split computes every map, its spectrum, the FORGrad cutoff sweep and, at every cutoff, the
faithfulness (FORGrad protocol) and localisation (against the ground-truth masks) metrics. A
second, smaller job per model computes the robustness metric for the gradient methods alone:
it recomputes every map ``samples`` times per cutoff, which for RISE and Occlusion would cost
more than all the rest of the run. Each store is aggregated and evaluated (cutoffs chosen on a
validation quarter of the images, scores reported on the rest). ``answer`` then reads the
evaluation tables and states:

1. does low-pass filtering improve the gradient methods' faithfulness?
2. does it improve their localisation?
3. does the best cutoff differ between the standard and the anti-aliased model?
4. how does the method ranking change (on faithfulness, and on localisation)?
5. does filtering change the gradient methods' robustness?

Every number comes with a bootstrap 95% interval over images. The answer is written as tables
(``answer_*.parquet``), as text (``answer.md``) and into the report, which shows both models.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import generate as gen
from . import train as tr

if TYPE_CHECKING:
    from ..evaluation.data import MetricTable

#: the methods the FORGrad question is about: maps computed through the input gradient
GRADIENT_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "guided_backprop")
#: every method of the run: the gradient family, then the CAM and prediction-based references
METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 16, "noise_level": 0.15},
    "guided_backprop": {},
    "gradcam": {},
    "occlusion": {"patch": 16, "stride": 16},
    "rise": {"masks": 200, "grid": 8},
}
QUICK_METHODS = ("saliency", "integrated_gradients", "gradcam")
FAITHFULNESS: dict[str, dict[str, Any]] = {"forgrad_protocol": {"steps": 10}}
#: the gradient's sign says which way the score moves, not where the evidence is: |map| throughout
LOCALISATION: dict[str, dict[str, Any]] = {
    "pointing_game": {"abs": True},
    "attribution_localisation": {"abs": True},
    "top_k_intersection": {"abs": True},
    "relevance_mass_accuracy": {"abs": True},
    "relevance_rank_accuracy": {"abs": True},
    "auc": {"abs": True},
}
ROBUSTNESS: dict[str, dict[str, Any]] = {"avg_sensitivity": {"samples": 2}}
#: the robustness job's share of the images (it recomputes each gradient map 2 x 6 times)
ROBUSTNESS_FRACTION = 0.4
#: FORGrad's filter takes the absolute value of the map before and after the low-pass; the raw
#: map is FORGrad's "before" point. This sigma lies beyond every frequency of the map (1000 at
#: 224 px is 571 cycles per image at 128 px, the Nyquist corner 91): FORGrad's pre-processing
#: without any filtering, the control that tells the absolute value's effect from the low-pass's
ABS_ONLY_SIGMA = 1000
#: FORGrad's sigma at 224 px (cycles per image), scaled to the benchmark's size by the job; 15 is
#: the paper's recommendation
SWEEP = (ABS_ONLY_SIGMA, 100, 50, 30, 15, 8)
QUICK_SWEEP = (ABS_ONLY_SIGMA, 15)
#: names of the two models in tables and text
MODEL_LABELS = {"benchmark_resnet": "standard", "benchmark_resnet_aa": "anti-aliased"}
#: a model whose accuracy on the run's images is below this gets no verdict ("N better and M
#: worse"): the maps of a model near chance (1/6 here) say nothing about how filtering acts on the
#: maps of a model that works; its numbers are still listed, marked as such
MIN_VERDICT_ACCURACY = 0.8
#: what ``--quick`` leaves out, said at the top of its answer
QUICK_NOTE = (f"a `--quick` run ({len(QUICK_METHODS)} methods, {len(QUICK_SWEEP)} cutoffs, 5 deletion steps, "
              "1 robustness sample): it shows the pipeline works, not the answer")


def job_config(data_dir: Path, out_dir: Path, model: str, images: int, workers: int, quick: bool,
               robustness: bool = False) -> dict[str, Any]:
    """The attribution job of one model over the first ``images`` test images; ``robustness``:
    the robustness job (the gradient methods, the robustness metric)."""
    manifest = gen.read_manifest(data_dir)
    size = int(manifest["size"])
    methods = {k: v for k, v in METHODS.items() if not quick or k in QUICK_METHODS}
    metrics = {**FAITHFULNESS, **LOCALISATION}
    if quick:
        metrics["forgrad_protocol"] = {**metrics["forgrad_protocol"], "steps": 5}
    if robustness:
        methods = {k: v for k, v in methods.items() if k in GRADIENT_METHODS}
        metrics = {k: {**v, "samples": 1} if quick else v for k, v in ROBUSTNESS.items()}
    return {
        "data": {"format": "parquet", "path": str(data_dir / "data" / "test-*.parquet"), "image_size": size,
                 "channels": 3, "mask_column": "mask", "limit": images},
        "store": str(out_dir / f"{model}{'-robustness' if robustness else ''}.zarr"),
        "model": {"kind": "callable", "name": "distributed_attr.benchmark.models:BenchmarkResNet",
                  "kwargs": {"in_channels": 3, "num_classes": len(gen.CLASSES), "width": tr.WIDTH,
                             "anti_aliased": tr.MODELS[model]},
                  "weights": str(data_dir / "models" / f"{model}.pt")},
        "methods": methods,
        "spectra": {"enabled": not robustness},  # the main job's store has the same maps' spectra
        "filters": {"kind": "forgrad", "sweep": list(QUICK_SWEEP if quick else SWEEP), "reference_size": 224},
        "metrics": metrics,
        "run": {"num_workers": workers, "unit_size": 32, "batch_size": 32, "seed": 0, "target": "label"},
    }


@dataclass(frozen=True)
class Answer:
    """The four answers as tables (pandas DataFrames) and as text."""

    filtering: Any  # model, metric, family, method, best_cutoff(+_224), test_unfiltered, test_best, gain, CI, p,
    #                 and the split: abs_gain (|map| alone) and lowpass_gain (filtering beyond |map|), CIs
    cutoffs: Any  # model, method, metric, best cutoff: validation choice and its bootstrap distribution
    rankings: Any  # model, method, mean rank unfiltered/filtered with CIs
    text: str
    accuracy: Any = None  # model -> {"accuracy", "images", "recorded"}: see model_accuracy


def model_accuracy(store: str) -> dict[str, Any]:
    """The model's accuracy on the images of a store (its ``prediction`` against the ``label`` of
    the images that were processed): the held-out test images the answer is computed from."""
    from ..io.store import Keys, open_group

    g = open_group(store)
    ok = g[Keys.OK][:].astype(bool)
    label, pred = g[Keys.LABEL][:][ok], g[Keys.PREDICTION][:][ok]
    known = label >= 0
    n = int(known.sum())
    return {"accuracy": float((pred[known] == label[known]).mean()) if n else float("nan"), "images": n}


def _recorded_accuracy(data_dir: Path, model: str) -> float | None:
    """The test accuracy ``benchmark build`` recorded (whole test split), when its record is there."""
    path = data_dir / "models" / f"{model}.json"
    try:
        return float(json.loads(path.read_text())["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sigma_224(cutoff: float, size: int) -> float:
    return cutoff * 224 / size if math.isfinite(cutoff) else math.inf


def _cutoff_distribution(table: "MetricTable", method: str, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The cutoff that maximises the mean score, over bootstrap resamples of all usable images:
    (median, 2.5 %, 97.5 % quantiles), in cycles per image at the image size. A narrow interval
    means the choice is stable; two models whose intervals do not overlap choose differently."""
    from ..evaluation.stats import bootstrap_means

    v = table.values[method]
    v = v[np.isfinite(v).all(axis=1)]
    boot = bootstrap_means(v, n_boot, seed)  # (n_boot, K)
    pick = np.argmax(boot if table.higher_is_better else -boot, axis=1)
    lo, med, hi = np.quantile(np.sort(table.cutoffs[pick]), [0.025, 0.5, 0.975], method="nearest")
    return float(med), float(lo), float(hi)


def _split_gain(table: "MetricTable", method: str, size: int, n_boot: int, seed: int) -> dict[str, float]:
    """FORGrad's gain split in two, on the evaluation's test images with its validation split:
    ``abs_gain``, the absolute value alone (sigma = ABS_ONLY_SIGMA against the raw map), and
    ``lowpass_gain``, filtering beyond it (the finite sigma below ABS_ONLY_SIGMA chosen on the
    validation images, against ABS_ONLY_SIGMA); each signed so that > 0 is better, with its paired
    bootstrap 95% interval. Empty when the store's sweep has no ABS_ONLY_SIGMA."""
    from ..evaluation.stats import bootstrap_means, percentile_ci, validation_mask

    sigma = table.cutoffs * 224 / size
    control = np.flatnonzero(np.isclose(sigma, ABS_ONLY_SIGMA))
    candidates = np.flatnonzero(np.isfinite(sigma) & (sigma < ABS_ONLY_SIGMA))
    v = table.values[method]
    if v.ndim != 2 or not len(control) or not len(candidates):
        return {}
    keep = np.isfinite(v).all(axis=1)
    v, is_val = v[keep], validation_mask(table.images[keep], 0.25, seed)
    sign = 1.0 if table.higher_is_better else -1.0
    val, test = v[is_val], v[~is_val]
    means = sign * val[:, candidates].mean(0)
    best = int(candidates[int(np.argmax(means))])
    # the three conditions side by side: raw map, |map| alone, |map| low-passed
    conditions = test[:, [table.unfiltered_index, int(control[0]), best]]
    boot = bootstrap_means(conditions, n_boot, seed + 104729)
    condition_means = conditions.mean(0)
    out: dict[str, float] = {"lowpass_sigma_224": float(sigma[best])}
    for name, (a, b) in {"abs_gain": (1, 0), "lowpass_gain": (2, 1)}.items():
        gains = sign * (boot[:, a] - boot[:, b]) + 0.0
        lo, hi = percentile_ci(gains)
        point = sign * (condition_means[a] - condition_means[b]) + 0.0
        out.update({name: float(point), f"{name}_ci_low": float(lo), f"{name}_ci_high": float(hi)})
    return out


def answer(stores: dict[str, list[str]], size: int, n_boot: int = 1000, seed: int = 0, quick: bool = False,
           accuracy: dict[str, dict[str, Any]] | None = None) -> Answer:
    """Read the evaluation tables of the stores (model name -> its stores, ``run_evaluation``
    done on each) and answer the questions. ``accuracy``: model name -> ``model_accuracy`` (and
    optionally ``recorded``: the build's test accuracy); by default measured on each model's
    first store. ``quick``: said at the top of the text."""
    import pandas as pd

    from ..evaluation.data import load_metric
    from ..evaluation.rankings import rank_methods
    from ..io.store import outputs_dir

    rows, cut_rows, rank_rows = [], [], []
    for model, store in ((model, s) for model, ss in stores.items() for s in ss):
        out = outputs_dir(store)
        best = pd.read_parquet(out / "best_cutoffs.parquet")
        evaluated = sorted(set(best["method"]))  # read once, and only the methods the evaluation ranked
        tables = {metric: load_metric(store, metric, methods=evaluated) for metric in sorted(set(best["metric"]))}
        for r in best.itertuples():
            family = ("faithfulness" if r.metric in FAITHFULNESS else "localisation" if r.metric in LOCALISATION
                      else "robustness" if r.metric in ROBUSTNESS else "other")
            rows.append(dict(model=MODEL_LABELS.get(model, model), metric=r.metric, family=family, method=r.method,
                             gradient=r.method in GRADIENT_METHODS, best_cutoff=r.best_cutoff,
                             best_sigma_224=_sigma_224(r.best_cutoff, size), test_unfiltered=r.test_unfiltered,
                             test_best=r.test_best, gain=r.gain, gain_ci_low=r.gain_ci_low,
                             gain_ci_high=r.gain_ci_high, gain_p=r.gain_p, n_test=r.n_test,
                             **_split_gain(tables[r.metric], r.method, size, n_boot, seed)))
        methods = sorted(set(best["method"]))
        for metric in FAITHFULNESS:
            if metric not in set(best["metric"]):
                continue
            for method in methods:
                med, lo, hi = _cutoff_distribution(tables[metric], method, n_boot, seed)
                cut_rows.append(dict(model=MODEL_LABELS.get(model, model), metric=metric, method=method,
                                     gradient=method in GRADIENT_METHODS, best_sigma_224=_sigma_224(med, size),
                                     sigma_224_low=_sigma_224(lo, size), sigma_224_high=_sigma_224(hi, size)))
        present = set(best["metric"])
        for family, names in (("faithfulness", FAITHFULNESS), ("localisation", LOCALISATION)):
            names = [m for m in names if m in present]
            if not names:
                continue
            # each metric at its own validation-chosen cutoff; the mean rank over the family's metrics
            ranks = rank_methods(store, names, n_boot=n_boot, seed=seed)
            mean = ranks[ranks["metric"] == "mean rank"]
            for method, rr in mean.groupby("method"):
                u, f = rr[rr["condition"] == "unfiltered"].iloc[0], rr[rr["condition"] == "filtered"].iloc[0]
                rank_rows.append(dict(model=MODEL_LABELS.get(model, model), family=family, method=method,
                                      gradient=method in GRADIENT_METHODS,
                                      rank_unfiltered=u["rank"], rank_unfiltered_low=u["rank_ci_low"],
                                      rank_unfiltered_high=u["rank_ci_high"], rank_filtered=f["rank"],
                                      rank_filtered_low=f["rank_ci_low"], rank_filtered_high=f["rank_ci_high"],
                                      mean_rank_unfiltered=u["score"], mean_rank_filtered=f["score"]))
    filtering = pd.DataFrame(rows)
    cutoffs = pd.DataFrame(cut_rows)
    rankings = pd.DataFrame(rank_rows).sort_values(["model", "family", "rank_filtered"]).reset_index(drop=True)
    if accuracy is None:
        accuracy = {model: model_accuracy(ss[0]) for model, ss in stores.items()}
    labelled = {MODEL_LABELS.get(m, m): a for m, a in accuracy.items()}
    return Answer(filtering, cutoffs, rankings, _text(filtering, cutoffs, rankings, labelled, quick), labelled)


def _verdict_allowed(accuracy: dict[str, dict[str, Any]], model: str) -> bool:
    a = accuracy.get(model, {}).get("accuracy", float("nan"))
    return bool(a >= MIN_VERDICT_ACCURACY)  # NaN (unknown): no verdict


def _no_verdict(accuracy: dict[str, dict[str, Any]], model: str) -> str:
    a = accuracy.get(model, {}).get("accuracy", float("nan"))
    return f"no verdict: held-out accuracy {a:.3f} is below {MIN_VERDICT_ACCURACY:g}"


def _verdict(rows, gain: str = "gain") -> str:
    better = int((rows[f"{gain}_ci_low"] > 0).sum())
    worse = int((rows[f"{gain}_ci_high"] < 0).sum())
    return (f"{better} better and {worse} worse (95% interval of the gain above or below 0), "
            f"{len(rows) - better - worse} not distinguishable from no change")


def _g(v: float) -> str:
    return f"{v:+.3g}" if abs(v) >= 5e-4 or v == 0 else f"{v:+.1e}"


def _fmt_gain(r) -> str:
    return f"{_g(r.gain)} [{_g(r.gain_ci_low)}, {_g(r.gain_ci_high)}] at sigma {r.best_sigma_224:.3g}"


def _fmt_split(r) -> str:
    """'|map| alone +x [..]; low-pass beyond it +y [..] at sigma s', when the control was run."""
    if not isinstance(getattr(r, "abs_gain", None), float) or not np.isfinite(r.abs_gain):
        return ""
    return (f"; of which |map| alone {_g(r.abs_gain)} [{_g(r.abs_gain_ci_low)}, {_g(r.abs_gain_ci_high)}], "
            f"the low-pass beyond it {_g(r.lowpass_gain)} [{_g(r.lowpass_gain_ci_low)}, "
            f"{_g(r.lowpass_gain_ci_high)}] at sigma {r.lowpass_sigma_224:.3g}")


def _header(accuracy: dict[str, dict[str, Any]], quick: bool) -> list[str]:
    """What the answer stands on: the kind of run and each model's held-out accuracy."""
    lines = [f"**Run**: {QUICK_NOTE if quick else 'the full run (every method, cutoff and metric)'}.", ""]
    for model, a in accuracy.items():
        recorded = a.get("recorded")
        also = f"; {recorded:.3f} on the whole test split (build record)" if recorded is not None else ""
        mark = "" if _verdict_allowed(accuracy, model) else (
            f" (**below {MIN_VERDICT_ACCURACY:g}: no verdicts for this model**, its numbers are listed as they are)")
        lines.append(f"- **{model} model**: held-out accuracy {a['accuracy']:.3f} on the {a['images']} test "
                     f"images of this run{also}{mark}")
    return lines + ["", f"A model gets verdicts only at a held-out accuracy of {MIN_VERDICT_ACCURACY:g} or more "
                        f"(chance is 1/{len(gen.CLASSES)}): the maps of a model that has not learnt the task say nothing about "
                        "the question.", ""]


def _text(filtering, cutoffs, rankings, accuracy: dict[str, dict[str, Any]] | None = None,
          quick: bool = False) -> str:
    lines = ["# The FORGrad question on the generated benchmark", ""]
    accuracy = accuracy or {}
    lines += _header(accuracy, quick)
    if not len(filtering):
        return "\n".join(lines + ["No metric was evaluated."])
    grad = filtering[filtering["gradient"]]
    models = list(dict.fromkeys(filtering["model"]))

    def verdict(model, rows):
        return _verdict(rows, _lowpass(rows)) if _verdict_allowed(accuracy, model) else _no_verdict(accuracy, model)
    lines += ["Gains are test-image means at the cutoff chosen on the validation images minus the unfiltered "
              "mean, signed so that > 0 is better, with paired-bootstrap 95% intervals; sigma is the FORGrad "
              "cutoff in cycles per image at 224 px (the paper's units). FORGrad's filter takes the absolute "
              f"value of the map before and after the low-pass, so its gain over the raw map is split in two "
              f"where the sweep holds the control sigma = {ABS_ONLY_SIGMA} (beyond every frequency: the "
              "absolute value alone): the absolute value's share, and the low-pass's share beyond it "
              "(sigma chosen on the validation images among the finite ones). The verdicts count the "
              "low-pass's share when it is there.", ""]
    lines += ["## 1. Does low-pass filtering improve the gradient methods' faithfulness?", ""]
    for model in models:
        rows = grad[(grad["model"] == model) & (grad["family"] == "faithfulness")]
        if len(rows):
            lines.append(f"- **{model} model**: {verdict(model, rows)}.")
            lines += [f"  - {r.method}: FORGrad {_fmt_gain(r)}{_fmt_split(r)}" for r in rows.itertuples()]
    lines += ["", "## 2. Does it improve their localisation?", ""]
    for model in models:
        rows = grad[(grad["model"] == model) & (grad["family"] == "localisation")]
        if len(rows):
            lines.append(f"- **{model} model**, {rows['metric'].nunique()} localisation metrics x "
                         f"{rows['method'].nunique()} gradient methods: {verdict(model, rows)}.")
            for metric, mr in rows.groupby("metric", sort=False):
                lines.append(f"  - {metric}:")
                lines += [f"    - {r.method}: FORGrad {_fmt_gain(r)}{_fmt_split(r)}" for r in mr.itertuples()]
    lines += ["", "## 3. Does the best cutoff differ between the standard and the anti-aliased model?", ""]
    gc = cutoffs[cutoffs["gradient"]] if len(cutoffs) else cutoffs
    if len(gc) and len(models) == 2:
        lines.append("Best sigma (at 224 px) for the FORGrad protocol score: median and 95% interval of the "
                     "argmax over bootstrap resamples of the images (inf = unfiltered).")
        differ = 0
        for method, mr in gc.groupby("method", sort=False):
            a, b = (mr[mr["model"] == m].iloc[0] for m in models)
            disjoint = a.sigma_224_high < b.sigma_224_low or b.sigma_224_high < a.sigma_224_low
            differ += bool(disjoint)
            lines.append(f"- {method}: {models[0]} {a.best_sigma_224:.3g} [{a.sigma_224_low:.3g}, {a.sigma_224_high:.3g}], "
                         f"{models[1]} {b.best_sigma_224:.3g} [{b.sigma_224_low:.3g}, {b.sigma_224_high:.3g}]"
                         f"{' (intervals disjoint)' if disjoint else ''}")
        if all(_verdict_allowed(accuracy, m) for m in models):
            lines.append(f"- Disjoint intervals for {differ} of {gc['method'].nunique()} gradient methods.")
        else:
            low = [m for m in models if not _verdict_allowed(accuracy, m)]
            lines.append(f"- No verdict: {', '.join(_no_verdict(accuracy, m).replace('no verdict: ', m + ' model ') for m in low)}.")
    lines += ["", "## 4. How does the ranking change?", "",
              "Rank 1 = best; unfiltered -> each method at its validation-chosen cutoff, with the 95% interval "
              "of the filtered rank; for a family of several metrics, the rank of the mean rank.", ""]
    for family in dict.fromkeys(rankings["family"]) if len(rankings) else ():
        for model in models:
            rr = rankings[(rankings["model"] == model) & (rankings["family"] == family)].sort_values("rank_unfiltered")
            lines.append(f"- **{model} model, {family}**: " + "; ".join(
                f"{r.method} {r.rank_unfiltered:g} -> {r.rank_filtered:g} [{r.rank_filtered_low:g}, "
                f"{r.rank_filtered_high:g}]" for r in rr.itertuples()))
    robust = grad[grad["family"] == "robustness"]
    if len(robust):
        lines += ["", "## 5. Does filtering change the gradient methods' robustness?", "",
                  f"{', '.join(sorted(set(robust['metric'])))} (lower is better; the gain is signed so that > 0 "
                  "means more robust), on the robustness job's images.", ""]
        for model in models:
            rows = robust[robust["model"] == model]
            if len(rows):
                lines.append(f"- **{model} model**: {verdict(model, rows)}.")
                lines += [f"  - {r.method}: FORGrad {_fmt_gain(r)}{_fmt_split(r)}" for r in rows.itertuples()]
    return "\n".join(lines) + "\n"


def _lowpass(rows) -> str:
    """The gain column the verdicts count: the low-pass's share when the control was run."""
    return "lowpass_gain" if "lowpass_gain" in rows and rows["lowpass_gain"].notna().all() else "gain"


def run_benchmark(data_dir: str | Path = "benchmark-data", out_dir: str | Path = "benchmark-run", images: int = 240,
                  workers: int = 2, quick: bool = False, plots: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both models' jobs (resumed when a store exists), aggregation, evaluation, the answer and
    one report (with the figures unless ``plots`` is False). Returns paths, timings and the
    answer's text."""
    from ..aggregate import run_aggregation
    from ..evaluation import run_evaluation
    from ..io.store import outputs_dir
    from ..report import write_report
    from ..runner import run

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest = gen.read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"no benchmark at {str(data_dir)!r}: run 'distributed-attr benchmark build --out {data_dir}' first")
    missing = [m for m in tr.MODELS if not (data_dir / "models" / f"{m}.pt").exists()]
    if missing:
        raise FileNotFoundError(f"{data_dir}/models lacks {missing}: run 'distributed-attr benchmark build --out {data_dir}' again")
    images = min(int(images), int(manifest["counts"]["test"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    stores: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    jobs = [(model, False, images) for model in tr.MODELS]
    jobs += [(model, True, max(8, round(images * ROBUSTNESS_FRACTION))) for model in tr.MODELS]
    for model, robustness, n in jobs:
        cfg = job_config(data_dir, out_dir, model, n, workers, quick, robustness=robustness)
        t0 = time.perf_counter()
        resume = Path(cfg["store"]).exists()
        log(f"{model}: {'resuming' if resume else 'attributing'} {n} test images, {len(cfg['methods'])} methods, "
            f"{', '.join(cfg['metrics'])}, {len(cfg['filters']['sweep'])} cutoffs -> {cfg['store']}")
        summary = run(cfg, resume=resume, progress=True)
        log("  " + str(summary).replace("\n", "\n  "))
        if not robustness:
            run_aggregation(cfg["store"], num_workers=workers, plots=plots)
        run_evaluation(cfg["store"], plots=plots)
        seconds[Path(cfg["store"]).stem] = round(time.perf_counter() - t0, 1)
        stores.setdefault(model, []).append(cfg["store"])
    accuracy = {m: {**model_accuracy(ss[0]), "recorded": _recorded_accuracy(data_dir, m)} for m, ss in stores.items()}
    result = answer(stores, int(manifest["size"]), quick=quick, accuracy=accuracy)
    main_stores = [ss[0] for ss in stores.values()]
    out = outputs_dir(main_stores[0])
    result.filtering.to_parquet(out / "answer_filtering.parquet", index=False)
    result.cutoffs.to_parquet(out / "answer_cutoffs.parquet", index=False)
    result.rankings.to_parquet(out / "answer_rankings.parquet", index=False)
    (out_dir / "answer.md").write_text(result.text)
    report = write_report(main_stores[0], companions=main_stores[1:], preface=result.text)
    record = {"images": images, "quick": quick, "workers": workers, "seconds": seconds, "stores": stores,
              "accuracy": accuracy, "min_verdict_accuracy": MIN_VERDICT_ACCURACY,
              "answer": str(out_dir / "answer.md"), "report": str(report)}
    (out_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    log(result.text)
    log(f"report: {report}")
    return {**record, "text": result.text}
