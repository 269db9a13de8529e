"""``distributed-attr demo``: the whole pipeline on real bundled data, offline, on a laptop CPU.

1. trains (once, then cached) three small classifiers on scikit-learn's handwritten digits;
2. writes held-out digits as Parquet shards in the Hugging Face layout, as a user's data would be;
3. runs the attribution job on a local Ray instance (every method, spectra, a low-pass sweep and
   the faithfulness metrics, with the two other architectures as evaluators);
4. aggregates the store (dataset-wide spectra), evaluates it (best cutoffs, rankings,
   cross-architecture matrix) and writes the report;
5. prints where everything is and what it shows.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEMO_METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 16},
    "vargrad": {"samples": 16},
    "squaregrad": {"samples": 16},
    "guided_backprop": {},
    "gradcam": {},
    "gradcam_pp": {},
    "occlusion": {"patch": 4, "stride": 4},
    "rise": {"masks": 200, "grid": 4},
    "sobol": {"grid": 4, "design": 8},
    "soundness_saliency": {"steps": 30, "backgrounds": 4},
    "lrp": {},
}
#: the transformer stage: the gradient family, Grad-CAM on the last block's tokens, and the two
#: attention methods, on the zoo's digit-size ViT (spectra only)
VIT_METHODS: dict[str, dict[str, Any]] = {
    "saliency": {},
    "gradient_x_input": {},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 16},
    "gradcam": {},
    "occlusion": {"patch": 4, "stride": 4},
    "attention_rollout": {},
    "attention_relevance": {},
}
QUICK_METHODS = ("saliency", "gradient_x_input", "integrated_gradients", "gradcam", "occlusion")
DEMO_METRICS: dict[str, dict[str, Any]] = {
    # deletion towards 0, insertion from a blurred image, score = AUC_ins - AUC_del (Muzellec et al.)
    "forgrad_protocol": {"steps": 10, "blur_size": 5, "blur_sigma": 2.0},
    "mufidelity": {"grid": 4, "n_subsets": 16},
    "feature_detection": {"keep": [0.1, 0.3]},
    "sparseness": {},
    "complexity": {},
}


def demo_config(out: Path, data_dir: Path, quick: bool, workers: int) -> dict[str, Any]:
    from . import zoo
    from .methods import METHODS

    methods = {k: v for k, v in DEMO_METHODS.items() if k in METHODS and (not quick or k in QUICK_METHODS)}
    metrics = {"forgrad_protocol": DEMO_METRICS["forgrad_protocol"]} if quick else dict(DEMO_METRICS)
    evaluators = {}
    for name in ("digits_vgg", "digits_resnet"):
        _, path = zoo.pretrained(name)
        evaluators[name] = {"kind": "zoo", "name": name, "weights": str(path)}
    _, weights = zoo.pretrained("digits_cnn")
    return {
        # the zoo models were trained on pixels in [0, 1]: no normalisation
        "data": {"format": "parquet", "path": str(data_dir), "image_size": 32, "channels": 1,
                 "mean": [0.0], "std": [1.0]},
        "store": str(out / "digits.zarr"),
        "model": {"kind": "zoo", "name": "digits_cnn", "weights": str(weights)},
        "methods": methods,
        "spectra": {"enabled": True, "hf_cutoff": 0.25},
        "filters": {"kind": "forgrad", "sweep": [100, 50], "reference_size": 224, "store_maps": [100, 50]},
        "metrics": metrics,
        "evaluators": {} if quick else evaluators,
        "run": {"num_workers": workers, "unit_size": 32, "batch_size": 32, "seed": 0},
    }



def run_demo(out_dir: str = "demo-output", images: int = 192, workers: int = 2, quick: bool = False) -> dict[str, Any]:
    from . import zoo
    from .data import digits_uint8, write_parquet_shards
    from .runner import run

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/5] models: training or loading the digits zoo (cache: {zoo.cache_dir()})")
    x, y = zoo.digits_dataset(32)
    _, test_idx = zoo.split_indices(len(x))
    for name in (*zoo.ARCHITECTURES, *(() if quick else zoo.TRANSFORMERS)):
        model, _ = zoo.pretrained(name)
        print(f"      {name:14s} held-out accuracy {zoo.accuracy(model, x[test_idx], y[test_idx]):.3f}")

    print(f"[2/5] data: {images} held-out digits -> Parquet shards")
    imgs, labels = digits_uint8(32, n=images, split="test")
    data_dir = out / "data"
    write_parquet_shards(data_dir, imgs, labels, shards=4)
    cfg = demo_config(out, data_dir, quick, workers)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"      config written to {out / 'config.yaml'} (rerun it with: distributed-attr run {out / 'config.yaml'})")

    print(f"[3/5] attribute: {len(cfg['methods'])} methods, {len(cfg['metrics'])} metrics, {workers} Ray workers")
    summary = run(cfg, overwrite=True, progress=True)
    print("      " + str(summary).replace("\n", "\n      "))
    result: dict[str, Any] = {"store": cfg["store"], "summary": summary}

    print("[4/5] aggregate and evaluate")
    from .aggregate import run_aggregation

    agg = run_aggregation(cfg["store"], num_workers=workers)
    result["aggregate"] = agg
    _print_spectra(cfg["store"])
    if cfg["metrics"]:
        from .evaluation import run_evaluation

        result["evaluation"] = run_evaluation(cfg["store"])
        _print_rankings(cfg["store"])
        if not quick:
            result["cross_architecture"] = cross_architecture_demo(cfg, out)
            result["downsampling"] = downsampling_demo(cfg["store"])
            result["transformer"] = transformer_demo(cfg, out)
    grid = write_example_grid(cfg["store"])
    print(f"      example maps: {grid}")

    print("[5/5] report")
    from .report import write_report

    # the transformer's store is a section of the same report: one page compares the two models
    report = write_report(cfg["store"], companions=[result["transformer"]] if "transformer" in result else ())
    result["report"] = report
    print(f"      report: {report}")
    print(f"done in {time.perf_counter() - t0:.0f} s. Inspect the store with: distributed-attr inspect {cfg['store']}")
    return result


#: methods explained on the other two architectures for the cross-architecture matrix
CROSS_METHODS = ("saliency", "integrated_gradients", "gradcam", "rise", "soundness_saliency")


def cross_architecture_demo(cfg: dict[str, Any], out: Path) -> Path:
    """Explain the same digits with the two other architectures too (a few methods, the
    feature-detection metric only), each evaluated by the other two, and write the full
    explaining model x evaluator matrix (Kadir et al.'s protocol) into the outputs folder."""
    from . import zoo
    from .evaluation import cross_architecture_matrix
    from .evaluation.plots import plot_cross_architecture
    from .report import outputs_dir
    from .runner import run

    stores = {"digits_cnn": cfg["store"]}
    for explainer in ("digits_vgg", "digits_resnet"):
        c = dict(cfg)
        _, weights = zoo.pretrained(explainer)
        c["model"] = {"kind": "zoo", "name": explainer, "weights": str(weights)}
        c["evaluators"] = {n: {"kind": "zoo", "name": n, "weights": str(zoo.pretrained(n)[1])}
                           for n in zoo.ARCHITECTURES if n != explainer}
        c["methods"] = {m: p for m, p in cfg["methods"].items() if m in CROSS_METHODS}
        c["metrics"] = {"feature_detection": cfg["metrics"]["feature_detection"]}
        c["filters"] = {"sweep": []}
        c["spectra"] = {"enabled": False}
        c["store"] = str(out / f"digits-{explainer}.zarr")
        print(f"      cross-architecture: explaining {explainer} ({len(c['methods'])} methods)")
        run(c, overwrite=True, progress=False)
        stores[explainer] = c["store"]
    matrix = cross_architecture_matrix(stores, methods=list(CROSS_METHODS))
    dest = outputs_dir(cfg["store"])
    dest.mkdir(parents=True, exist_ok=True)
    matrix.to_parquet(dest / "cross_architecture_matrix.parquet", index=False)
    plot_cross_architecture(matrix, dest / "cross_architecture_matrix.png")
    keep = matrix["keep"].max()
    table = matrix[matrix["keep"] == keep].pivot_table(index="explainer", columns="evaluator", values="accuracy")
    print(f"      feature-detection accuracy, mean over {', '.join(CROSS_METHODS)} at keep={keep:g} "
          "(rows: explaining model, columns: evaluator)")
    print("        " + table.round(3).to_string().replace("\n", "\n        "))
    return dest / "cross_architecture_matrix.parquet"


def downsampling_demo(store: str, n: int = 64) -> Path:
    """Where the high frequencies come from: for each zoo architecture, the spectrum of the
    gradient at the input of every downsampling stage, and the input gradient of the model
    against its anti-aliased copy (BlurPool, same weights). One figure in the outputs folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from . import zoo
    from .report import outputs_dir
    from .spectral import high_frequency_fraction_from_spectrum, radial_bin_counts
    from .spectral.downsampling import compare_input_gradient_spectra, stage_gradient_spectra

    x, _ = zoo.digits_dataset(32)
    _, test_idx = zoo.split_indices(len(x))
    images = torch.from_numpy(x[test_idx[:n]])
    fig, axes = plt.subplots(2, len(zoo.ARCHITECTURES), figsize=(4.2 * len(zoo.ARCHITECTURES), 7), squeeze=False)
    print("      where the high frequencies come from: input-gradient power above 0.25 cycles/px")
    for col, name in enumerate(zoo.ARCHITECTURES):
        model, _ = zoo.pretrained(name)
        with torch.no_grad():
            target = model(images).argmax(1)
        stages = stage_gradient_spectra(model, images, target)
        ax = axes[0, col]
        for label, (freqs, power) in stages.items():
            keep = freqs > 0
            ax.loglog(freqs[keep].numpy(), (power[keep] / power.sum()).numpy(), label=label)
        ax.set_title(f"{name}: gradient at each stage's input", fontsize=9)
        ax.set_xlabel("cycles per pixel of the stage's grid", fontsize=8)
        ax.legend(fontsize=6)
        pair = compare_input_gradient_spectra(model, images, target)
        ax = axes[1, col]
        hf = {}
        for label, (freqs, power) in pair.items():
            keep = freqs > 0
            ax.loglog(freqs[keep].numpy(), (power[keep] / power.sum()).numpy(), label=label)
            counts = torch.from_numpy(radial_bin_counts(32, 32)).to(power.dtype)
            hf[label] = float(high_frequency_fraction_from_spectrum(freqs, power, counts, 0.25))
        ax.set_title(f"{name}: input gradient, original vs anti-aliased", fontsize=9)
        ax.set_xlabel("cycles per pixel", fontsize=8)
        ax.legend(fontsize=7)
        print(f"        {name:14s} original {hf['original']:.3f}  anti-aliased {hf['antialiased']:.3f}")
    import matplotlib.ticker

    for ax in axes.ravel():
        ax.set_ylabel("power profile / its sum", fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    dest = outputs_dir(store)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "stage_gradient_spectra.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print_rankings(store: str) -> None:
    """Mean rank over the faithfulness metrics, unfiltered vs each method's best cutoff."""
    import pandas as pd

    from .report import outputs_dir

    ranks = pd.read_parquet(outputs_dir(store) / "rankings.parquet")
    mean = ranks[ranks["metric"] == "mean rank"].pivot_table(index="method", columns="condition", values="rank")
    print("      mean rank over the faithfulness metrics (1 = most faithful; test images, cutoff chosen on validation)")
    print("        method                 unfiltered  filtered")
    for method, row in mean.sort_values("filtered").iterrows():
        print(f"        {method:22s} {row['unfiltered']:10.1f}  {row['filtered']:8.1f}")


def transformer_demo(cfg: dict[str, Any], out: Path) -> str:
    """The same digits explained by a vision transformer (the zoo's ``digits_vit``, trained and
    cached like the CNNs): a model that downsamples once, by its 4 x 4 patch embedding. Spectra
    only; the store sits beside the CNN's and is aggregated so that the report shows its spectra
    and example maps in a section of its own."""
    from . import zoo
    from .runner import run

    model, weights = zoo.pretrained("digits_vit")
    x, y = zoo.digits_dataset(32)
    _, test_idx = zoo.split_indices(len(x))
    c = dict(cfg)
    c["store"] = str(out / "digits-vit.zarr")
    c["model"] = {"kind": "zoo", "name": "digits_vit", "weights": str(weights)}
    c["methods"] = dict(VIT_METHODS)
    c["metrics"], c["evaluators"] = {}, {}
    c["filters"] = {**cfg["filters"], "store_maps": []}
    print(f"      transformer: digits_vit (held-out accuracy {zoo.accuracy(model, x[test_idx], y[test_idx]):.3f}), "
          f"{len(c['methods'])} methods, spectra")
    run(c, overwrite=True, progress=False)
    _print_spectra(c["store"])
    from .aggregate import run_aggregation

    run_aggregation(c["store"], num_workers=0)  # 192 maps a method: Ray's start-up would cost more than it saves
    write_example_grid(c["store"])
    return c["store"]


def _print_spectra(store: str) -> None:
    """Mean radial spectrum summary per method: the mean of the images' high-frequency fractions,
    and the log-log slope of the mean spectrum (as the aggregation computes it)."""
    from .aggregate.spectra import loglog_slope
    from .io.store import AttributionStore, Keys

    st = AttributionStore.open(store, "r")
    usable = st.usable()
    freqs = st.group[Keys.FREQUENCY][:]
    rows = []
    for m in st.attrs["methods"]:
        hf = st.group[Keys.hf_fraction(m)][:, 0][usable]
        power = np.nanmean(st.group[Keys.spectra(m)][:, 0, :][usable], axis=0)
        slope = float(loglog_slope(freqs, power)[0])
        rows.append((float(np.nanmean(hf)), m, slope))
    print("      mean radial spectra (unfiltered): high-frequency fraction (> 0.25 cycles/px), log-log slope")
    for hf, m, slope in sorted(rows, reverse=True):
        print(f"        {m:22s} hf={hf:6.3f}  slope={slope:6.2f}")


def map_colour_scale(a: np.ndarray) -> tuple[str, float, float]:
    """``(colour map, vmin, vmax)`` for showing one map: symmetric around zero on a diverging
    scale when the map has negative values, else from its own minimum to its maximum."""
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo < 0:
        lim = max(-lo, abs(hi))
        return "RdBu_r", -lim, lim
    return "viridis", lo, hi if hi > lo else lo + 1.0


def write_example_grid(store: str, path: Path | None = None, n: int = 6) -> Path:
    """A PNG grid: example images (rows) beside each method's raw map (columns), written by default
    to the store's outputs folder as ``examples.png`` (where the report finds it).

    Each map is scaled on its own: signed maps symmetric around zero (so white means 0), maps that
    are never negative from their minimum to their maximum. Scaling an unsigned map from zero
    would show RISE's maps, which sit on a large offset, as one flat colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .config import Config
    from .io.sources import decode_image, open_source
    from .io.store import AttributionStore, Keys, outputs_dir

    path = path or outputs_dir(store) / "examples.png"
    path.parent.mkdir(parents=True, exist_ok=True)

    st = AttributionStore.open(store, "r")
    g = st.group
    cfg = Config.from_dict(st.attrs["config"])
    methods = list(st.attrs["methods"])
    idx = np.flatnonzero(st.usable())[:n]
    src = open_source(cfg.data)
    fig, axes = plt.subplots(len(idx), len(methods) + 1, figsize=(1.3 * (len(methods) + 1), 1.3 * len(idx)),
                             squeeze=False)
    for r, i in enumerate(idx):
        rec = next(iter(src.read(int(i), int(i) + 1)))
        img = decode_image(rec.payload, cfg.data)[0].numpy()
        axes[r, 0].imshow(img, cmap="gray")
        axes[r, 0].set_title(f"#{i} y={g[Keys.LABEL][i]} t={g[Keys.TARGET][i]}", fontsize=6)
        for c, m in enumerate(methods, start=1):
            a = g[Keys.maps(m)][int(i)].astype(np.float32)
            cmap, vmin, vmax = map_colour_scale(a)
            axes[r, c].imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
            if r == 0:
                axes[r, c].set_title(m.replace("_", "\n"), fontsize=6)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
