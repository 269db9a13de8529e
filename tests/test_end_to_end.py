"""Every method, spectra, filters and metrics through the job, then aggregate, evaluate, report."""
import numpy as np
import pytest
import zarr

from distributed_attr.methods import METHODS
from distributed_attr.runner import run

#: small values for the parameters that set a method's work, by parameter name (as in
#: tests/test_methods_api.py): every registered method runs here, a new one without an edit
CHEAP_VALUES = {"steps": 4, "samples": 3, "masks": 16, "n_masks": 16, "design": 4, "grid": 4, "backgrounds": 2,
                "patch": 8, "stride": 8, "iterations": 3, "n_iter": 3}


def cheap(name: str) -> dict:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(METHODS.get(name).Params)}
    return {k: v for k, v in CHEAP_VALUES.items() if k in fields}


def runs_on(model) -> list[str]:
    """The registered methods that apply to ``model`` (attention methods need a transformer)."""
    return [m for m in METHODS.names() if METHODS.get(m).unsupported_reason(model) is None]


CNN_METHODS = runs_on(__import__("distributed_attr.zoo", fromlist=["build"]).build("digits_cnn"))


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, parquet_dir):
    from distributed_attr import zoo
    from tests.conftest import base_config

    tmp = tmp_path_factory.mktemp("e2e")
    _, vgg = zoo.pretrained("digits_vgg")
    cfg = base_config(parquet_dir, tmp / "full.zarr", unit_size=8)
    cfg["data"]["limit"] = 16
    cfg["methods"] = {m: cheap(m) for m in CNN_METHODS}
    cfg["spectra"] = {"enabled": True}
    cfg["filters"] = {"sweep": [100, 30], "store_maps": [30]}
    cfg["metrics"] = {"forgrad_protocol": {"steps": 4, "blur_size": 5, "blur_sigma": 2.0},
                      "mufidelity": {"grid": 4, "n_subsets": 8}, "feature_detection": {"keep": [0.2]},
                      "sparseness": {}, "complexity": {}}
    cfg["evaluators"] = {"digits_vgg": {"kind": "zoo", "name": "digits_vgg", "weights": str(vgg)}}
    summary = run(cfg, progress=False)
    assert summary.units_done == 2 and not summary.failures
    return cfg["store"]


def test_every_registered_method_lands_in_the_store(full_store):
    g = zarr.open_group(full_store, mode="r")
    assert set(g.attrs["methods"]) == set(CNN_METHODS)
    freq = g["spectra/frequency"][:]
    assert freq[0] == 0 and freq[-1] <= 0.5 + 1e-9
    for m in CNN_METHODS:
        maps = g[f"maps/{m}"][:].astype(np.float32)
        assert maps.shape == (16, 32, 32) and np.isfinite(maps).all(), m
        assert np.abs(maps).max() > 0, f"{m} produced all-zero maps"
        spectra = g[f"spectra/{m}"][:]
        assert spectra.shape == (16, 3, len(freq)) and np.isfinite(spectra).all(), m
        assert g[f"filtered_maps/{m}"].shape == (16, 1, 32, 32)
        hf = g[f"hf_fraction/{m}"][:]
        assert ((hf >= 0) & (hf <= 1)).all(), m
        # low-pass filtering can only remove high-frequency power
        assert (hf[:, 2] <= hf[:, 0] + 1e-5).all(), m
        for metric in g.attrs["metrics"]:
            outputs = list(g[f"metrics/{metric}"].group_keys())
            assert outputs, metric
            for out in outputs:
                values = g[f"metrics/{metric}/{out}/{m}"][:]
                assert values.shape[:2] == (16, 3), (metric, out, m)
                assert np.isfinite(values).all(), (metric, out, m)
    fd = g["metrics/feature_detection/correct/saliency"]
    assert fd.attrs["coords"]["evaluator"] == ["self", "digits_vgg"]


def test_aggregate_evaluate_and_report(full_store, tmp_path):
    from distributed_attr.aggregate import run_aggregation
    from distributed_attr.evaluation import run_evaluation
    from distributed_attr.report import write_report

    out = tmp_path / "outputs"
    run_aggregation(full_store, num_workers=0, out_dir=str(out))
    run_evaluation(full_store, out_dir=out)
    html = write_report(full_store, out_dir=str(out)).read_text()
    assert html.count("<img src='data:image/png;base64,") >= 3
    assert "<table" in html and "soundness_saliency" in html and "forgrad_protocol" in html
    assert (out / "report.md").exists()
    assert list(out.glob("*.parquet")), "aggregation and evaluation wrote no tables"
    # a complete store, aggregated and evaluated after its job: current, no banner
    import json

    assert "class='banner'" not in html
    manifest = json.loads((out / "evaluation.json").read_text())
    assert manifest["complete"] is True and manifest["partial"] is False and manifest["units_done"] == 2


def test_stored_spectra_obey_parseval_and_match_the_filter(full_store):
    import torch

    from distributed_attr.spectral import low_pass, radial_bin_counts, radial_spectrum

    g = zarr.open_group(full_store, mode="r")
    cutoffs = g["spectra/cutoff"][:]
    counts = radial_bin_counts(32, 32)
    for m in ("saliency", "integrated_gradients", "rise"):
        maps = torch.from_numpy(g[f"maps/{m}"][:].astype(np.float64))
        spectra = g[f"spectra/{m}"][:].astype(np.float64)
        # Parseval: the binned energy of the unfiltered spectrum is the map's energy
        np.testing.assert_allclose((spectra[:, 0] * counts).sum(-1), (maps ** 2).sum((1, 2)).numpy(), rtol=5e-3)
        # each sweep entry is the spectrum of the FORGrad-filtered map (float16 maps: loose rtol)
        for k in (1, 2):
            expected = radial_spectrum(low_pass(maps, float(cutoffs[k]), kind="forgrad"))[1].numpy()
            np.testing.assert_allclose(spectra[:, k], expected, rtol=2e-2, atol=1e-6 * expected.max())


def test_the_methods_a_cnn_cannot_take_run_on_a_transformer_and_are_refused_on_the_cnn(
        tmp_path, parquet_dir, monkeypatch):
    from tests.conftest import base_config

    from distributed_attr import zoo
    from distributed_attr.runner import JobError

    support = str(__import__("pathlib").Path(__file__).resolve().parent / "support")
    monkeypatch.syspath_prepend(support)
    others = [m for m in METHODS.names() if m not in CNN_METHODS]
    assert {"attention_rollout", "attention_relevance"} <= set(others)
    cfg = base_config(parquet_dir, tmp_path / "vit.zarr", unit_size=8)
    cfg["data"]["limit"] = 8
    cfg["model"] = {"kind": "callable", "name": "fault_models:random_digits_vit"}
    assert runs_on(zoo.build("digits_vit")) == runs_on(zoo.DigitsViT()) and set(others) <= set(runs_on(zoo.DigitsViT()))
    cfg["methods"] = {m: cheap(m) for m in [*others, "saliency"]}
    cfg["spectra"] = {"enabled": True}
    summary = run(cfg, progress=False)
    assert summary.units_done == 1 and not summary.failures
    g = zarr.open_group(str(tmp_path / "vit.zarr"), mode="r")
    for m in others:
        maps = g[f"maps/{m}"][:].astype(np.float32)
        assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0, m
    cfg["model"] = {"kind": "zoo", "name": "digits_cnn"}
    cfg["store"] = str(tmp_path / "cnn.zarr")
    with pytest.raises(JobError, match=r"methods.attention_(rollout|relevance) cannot explain this model"):
        run(cfg, progress=False)
    assert not (tmp_path / "cnn.zarr").exists()


def test_a_map_on_a_large_offset_is_shown_from_its_own_minimum():
    """The example grid used to scale every map from zero: RISE's maps (all values near their large
    mean) came out as one flat colour. Unsigned maps now span their own range; signed maps stay
    symmetric around zero so that white means 0."""
    from distributed_attr.demo import map_colour_scale

    rise_like = 0.8 + 0.01 * np.random.default_rng(0).random((32, 32))
    cmap, lo, hi = map_colour_scale(rise_like)
    assert (lo, hi) == (rise_like.min(), rise_like.max()) and cmap != "RdBu_r"
    signed = np.array([[-0.5, 2.0], [0.0, 1.0]])
    assert map_colour_scale(signed) == ("RdBu_r", -2.0, 2.0)
    flat = np.full((4, 4), 3.0)
    _, lo, hi = map_colour_scale(flat)
    assert hi > lo  # matplotlib needs a range


def test_one_report_holds_a_second_model_of_the_same_data(full_store, tmp_path, parquet_dir, monkeypatch):
    """``write_report(store, companions=[...])``: a transformer's store beside the CNN's, each in
    its own section with its own job facts, figures (its spectra and example maps) and tables."""
    from tests.conftest import base_config

    from distributed_attr.aggregate import run_aggregation
    from distributed_attr.demo import write_example_grid
    from distributed_attr.io.store import outputs_dir
    from distributed_attr.report import write_report

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).resolve().parent / "support"))
    cfg = base_config(parquet_dir, tmp_path / "vit.zarr", unit_size=8)
    cfg["data"]["limit"] = 8
    cfg["model"] = {"kind": "callable", "name": "fault_models:random_digits_vit"}
    cfg["methods"] = {"saliency": {}, "attention_rollout": {}}
    cfg["spectra"] = {"enabled": True}
    run(cfg, progress=False)
    run_aggregation(cfg["store"], num_workers=0)
    examples = write_example_grid(cfg["store"])
    assert examples == outputs_dir(cfg["store"]) / "examples.png"

    out = tmp_path / "cnn-outputs"
    html = write_report(full_store, out_dir=str(out), companions=[cfg["store"]]).read_text()
    assert html.count("<h3>Job</h3>") == 2
    assert "vit (callable:fault_models:random_digits_vit)" in html and "full (zoo:digits_cnn)" in html
    cnn_part, vit_part = html.split("vit (callable:fault_models:random_digits_vit)</h2>")
    assert "attention_rollout" in vit_part and "attention_rollout" not in cnn_part.split("<h2 id=")[-1]
    # the companion's own outputs: its spectra table and figures, and its example maps
    assert "<img src='data:image/png;base64," in vit_part and "examples" in vit_part
    assert html.count("<div class='scroll'><table") == html.count("<table") - 2  # all but the two job tables scroll
    md = (out / "report.md").read_text()
    assert md.count("### Job") == 2 and "## vit (callable:fault_models:random_digits_vit)" in md
    assert_fits_the_window(html, tmp_path)


def assert_fits_the_window(html: str, tmp_path, width: int = 1400) -> None:
    """The page fits a ``width``-px browser window, measured in headless Chromium where it is
    installed (``apt-get install chromium``; skipped otherwise): the report used to be wider than
    a 1,400-px window."""
    import re
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium on this machine")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>document.title = 'scrollWidth=' + "
                                              "document.documentElement.scrollWidth</script></body>"))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    measured = int(re.search(r"<title>scrollWidth=(\d+)</title>", out).group(1))
    assert measured <= width, f"the report is {measured} px wide in a {width}-px window"
