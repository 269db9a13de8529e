"""Methods, metrics and data sources from other installed packages (entry points), and the
built-in ones found by their files alone.

The plugin is a real distribution on ``sys.path``: a module plus a ``.dist-info`` folder whose
``entry_points.txt`` declares it, which is what ``pip install`` of a package with
``[project.entry-points."distributed_attr.methods"]`` leaves behind."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from distributed_attr.config import Config, ConfigError
from distributed_attr.io.sources import SOURCES
from distributed_attr.methods import METHODS, build_method
from distributed_attr.metrics import METRICS
from distributed_attr.registry import RegistryError

PLUGIN = '''
"""A third-party package: one method, one metric and one data source."""
import numpy as np
import torch

from distributed_attr.io.sources import Record, Source, register_source
from distributed_attr.methods.base import Method, register
from distributed_attr.metrics.base import Metric, register as register_metric


@register
class InputMagnitude(Method):
    """|x| summed over channels: needs no model."""

    name = "plugin_input_magnitude"
    family = "gradient"
    signed = False

    def attribute(self, model, x, target, ctx):
        return x.abs().sum(1)


@register_metric
class MapMean(Metric):
    """The mean of the map."""

    name = "plugin_map_mean"
    higher_is_better = True
    score_output = "score"
    needs_model = False

    def evaluate(self, model, x, maps, target, ctx):
        return {"score": maps.flatten(1).mean(1)}


@register_source
class Ramp(Source):
    """Images 0..n-1 of constant value i (no files: the path says n)."""

    name = "plugin_ramp"

    def __init__(self, cfg, storage_options=None):
        self.cfg, self.n = cfg, int(cfg.path)

    def __len__(self):
        return self.n

    def read(self, start, stop):
        for i in range(start, min(stop, self.n)):
            img = np.full((self.cfg.image_size, self.cfg.image_size), i % 256, np.uint8)
            yield Record(index=i, payload=img, label=i % 10, name=f"ramp{i}", key=f"ramp/{i}")

    def listing(self):
        return [["ramp", self.n, 0, self.n]]
'''


def install(root, name: str, module_source: str, groups: dict[str, str]) -> None:
    """What pip leaves for a package ``name`` with one module and its entry points."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(f"[{group}]\n{value}\n\n" for group, value in groups.items()))


@pytest.fixture
def registries():
    """The registries as they were, restored after the test (a plugin stays registered in this
    process otherwise)."""
    saved = [(r, dict(r._items), dict(r.plugin_errors)) for r in (METHODS, METRICS, SOURCES)]
    yield
    for r, items, errors in saved:
        r._items, r.plugin_errors = items, errors


def test_an_installed_package_adds_a_method_a_metric_and_a_source(tmp_path, monkeypatch, registries):
    install(tmp_path, "daplugin", PLUGIN, {"distributed_attr.methods": "magnitude = daplugin",
                                           "distributed_attr.metrics": "mean = daplugin",
                                           "distributed_attr.sources": "ramp = daplugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_input_magnitude" not in METHODS
    assert METHODS.load_plugins() == ["magnitude = daplugin"]
    METRICS.load_plugins(), SOURCES.load_plugins()
    assert "plugin_map_mean" in METRICS and "plugin_ramp" in SOURCES

    # a whole job with them, from a config as a user writes it
    cfg = Config.from_dict({
        "data": {"format": "plugin_ramp", "path": "12", "image_size": 8, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": str(tmp_path / "s.zarr"), "model": {"kind": "zoo", "name": "digits_cnn"},
        "methods": {"plugin_input_magnitude": {}, "saliency": {}}, "metrics": {"plugin_map_mean": {}},
        "spectra": {"enabled": False}, "run": {"num_workers": 0, "unit_size": 4, "batch_size": 4}})
    from distributed_attr.io.store import AttributionStore, Keys
    from distributed_attr.runner import run

    pytest.importorskip("sklearn")  # the zoo model trains on scikit-learn's digits
    run(cfg, overwrite=True)
    st = AttributionStore.open(cfg.store, "r")
    assert st.usable().all()
    maps = st.group[Keys.maps("plugin_input_magnitude")][:].astype(np.float64)
    # the ramp's image i is i/255 everywhere (std 1, mean 0): the map is that, and its mean too
    expected = np.arange(12) / 255.0
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), expected, atol=1e-3)
    score = st.group[Keys.metric("plugin_map_mean", "score", "plugin_input_magnitude")][:, 0]
    np.testing.assert_allclose(score, expected, atol=1e-3)


def test_a_broken_plugin_is_named_where_its_method_is_missing(tmp_path, monkeypatch, registries):
    install(tmp_path, "broken_plugin", "import a_module_that_is_not_installed\n",
            {"distributed_attr.methods": "broken = broken_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert METHODS.load_plugins() == []  # recorded, not raised: the built-in methods still work
    assert build_method("saliency", {}).name == "saliency"
    with pytest.raises(RegistryError, match=r"unknown method 'broken'.*plugin 'broken = broken_plugin' did not load: "
                                            r"ModuleNotFoundError: No module named 'a_module_that_is_not_installed'"):
        build_method("broken", {})


def test_an_unknown_data_format_lists_every_registered_source(tmp_path, monkeypatch, registries):
    # (another module name than above: an imported module does not register its classes again)
    install(tmp_path, "daplugin_sources", PLUGIN, {"distributed_attr.sources": "ramp = daplugin_sources"})
    monkeypatch.syspath_prepend(str(tmp_path))
    SOURCES.load_plugins()
    with pytest.raises(ConfigError, match=r"^data\.format: 'tfrecord' is not one of \['folder', 'numpy', 'parquet', "
                                          r"'plugin_ramp', 'webdataset'\]$"):
        Config.from_dict({"data": {"format": "tfrecord", "path": "x"}, "store": str(tmp_path / "s.zarr")})


def test_every_module_of_the_methods_and_metrics_packages_is_imported():
    """A built-in method or metric is one file: each package imports all its modules (there is no
    list of them to extend)."""
    import pkgutil

    import distributed_attr.methods as methods
    import distributed_attr.metrics as metrics

    for pkg in (methods, metrics):
        modules = {i.name for i in pkgutil.iter_modules(pkg.__path__)}
        assert len(modules) > 5 and all(hasattr(pkg, name) for name in modules), pkg.__name__
    assert {"soundness_saliency", "lrp", "rise"} <= set(METHODS) and {"deletion", "sparseness"} <= set(METRICS)


def test_a_plugin_may_import_any_name_of_the_package_it_extends(tmp_path):
    """Plugins load when ``distributed_attr.methods`` (``.metrics``, ``.io.sources``) is first
    imported: in a fresh process, as in every Ray worker. They loaded halfway through that import,
    so a plugin importing ``compute_maps`` failed ("partially initialized module") and vanished."""
    import subprocess
    import sys

    install(tmp_path, "daplugin_imports", PLUGIN + "\nfrom distributed_attr.methods import attribute, compute_maps\n"
            "from distributed_attr.metrics import evaluate\nfrom distributed_attr.io.sources import open_source\n",
            {"distributed_attr.methods": "m = daplugin_imports", "distributed_attr.sources": "s = daplugin_imports"})
    code = ("import distributed_attr.methods as m, distributed_attr.io.sources as s; "
            "assert not m.METHODS.plugin_errors and not s.SOURCES.plugin_errors, (m.METHODS.plugin_errors, "
            "s.SOURCES.plugin_errors); assert 'plugin_input_magnitude' in m.METHODS and 'plugin_ramp' in s.SOURCES")
    proc = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_source_plugin_that_did_not_load_is_named_by_the_format_error(tmp_path, monkeypatch, registries):
    install(tmp_path, "broken_source", "raise RuntimeError('no tfrecord library here')\n",
            {"distributed_attr.sources": "tfrecord = broken_source"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert SOURCES.load_plugins() == []
    with pytest.raises(ConfigError, match=r"^data\.format: 'tfrecord' is not one of \[.*\]; plugin 'tfrecord = "
                                          r"broken_source' did not load: RuntimeError: no tfrecord library here$"):
        Config.from_dict({"data": {"format": "tfrecord", "path": "x"}, "store": str(tmp_path / "s.zarr")})
