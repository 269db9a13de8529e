"""Config validation: non-finite numbers, lower bounds, duplicate YAML keys, resolved parameters,
store moves; and the decompression-bomb guard of ``decode_image``. Fast, no Ray."""
import io
import time

import numpy as np
import pytest
from PIL import Image

from distributed_attr.config import Config, ConfigError, DataConfig, diff_configs
from distributed_attr.io.sources import decode_image


def raw(**over):
    out = {"data": {"path": "x", "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
           "store": "s.zarr"}
    out.update(over)
    return out


def data(**over):
    return {"path": "x", "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0], **over}


# -- non-finite numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_list_element_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^data\.std: expected a finite number, got (nan|inf|-inf)$"):
        Config.from_dict(raw(data=data(std=[value])))
    with pytest.raises(ConfigError, match=r"^filters\.sweep: expected a finite number"):
        Config.from_dict(raw(filters={"sweep": [value]}))


def test_non_finite_scalars_are_refused():
    with pytest.raises(ConfigError, match=r"^spectra\.hf_cutoff: expected a finite number, got nan"):
        Config.from_dict(raw(spectra={"hf_cutoff": float("nan")}))
    with pytest.raises(ConfigError, match=r"^run\.cpus_per_worker: expected a finite number, got inf"):
        Config.from_dict(raw(run={"cpus_per_worker": float("inf")}))
    # an int field given a non-finite float: a ConfigError, not int(nan)'s bare ValueError
    with pytest.raises(ConfigError, match=r"^run\.batch_size: expected a finite number, got nan"):
        Config.from_dict(raw(run={"batch_size": float("nan")}))


def test_non_finite_yaml_values_are_refused(tmp_path):
    (tmp_path / "job.yaml").write_text("data: {path: x, channels: 1, mean: [0.0], std: [.nan]}\nstore: s.zarr\n")
    with pytest.raises(ConfigError, match=r"data\.std: expected a finite number, got nan"):
        Config.from_yaml(tmp_path / "job.yaml")
    (tmp_path / "job.yaml").write_text("data: {path: x}\nstore: s.zarr\nfilters: {sweep: [.inf]}\n")
    with pytest.raises(ConfigError, match=r"filters\.sweep: expected a finite number, got inf"):
        Config.from_yaml(tmp_path / "job.yaml")


def test_non_finite_method_and_metric_parameters_are_refused():
    with pytest.raises(ConfigError, match=r"methods\.integrated_gradients\.baseline: expected a finite number, got nan"):
        Config.from_dict(raw(methods={"integrated_gradients": {"baseline": float("nan")}}))
    with pytest.raises(ConfigError, match=r"methods\.integrated_gradients\.steps: expected a finite number, got inf"):
        Config.from_dict(raw(methods={"integrated_gradients": {"steps": float("inf")}}))
    with pytest.raises(ConfigError, match=r"methods\.smoothgrad\.noise_level: expected a finite number"):
        Config.from_dict(raw(methods={"smoothgrad": {"noise_level": float("-inf")}}))
    # a `str | float` parameter: the finite-number message, not "expected a string"
    with pytest.raises(ConfigError, match=r"metrics\.mufidelity\.baseline: expected a finite number, got nan"):
        Config.from_dict(raw(metrics={"mufidelity": {"baseline": float("nan")}}))
    with pytest.raises(ConfigError, match=r"metrics\.feature_detection\.keep: expected a finite number, got inf"):
        Config.from_dict(raw(metrics={"feature_detection": {"keep": [0.1, float("inf")]}}))


# -- lower bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value, message", [
    ("run", "max_retries", -1, "max_retries must be >= 0"),
    ("run", "references", 0, "references must be >= 1"),
    ("run", "cpus_per_worker", -1, "cpus_per_worker must be >= 0"),
    ("run", "gpus_per_worker", -0.5, "gpus_per_worker must be >= 0"),
    ("run", "target", -1, "target must be"),
    ("run", "actor_timeout", 0, "actor_timeout must be > 0"),
    ("filters", "reference_size", 0, "reference_size must be >= 1"),
    ("filters", "order", 0, "order must be >= 1"),
])
def test_numeric_lower_bounds(section, key, value, message):
    with pytest.raises(ConfigError, match=rf"^{section}: {message}"):
        Config.from_dict(raw(**{section: {key: value}}))


def test_max_pixels_lower_bound_and_defaults():
    with pytest.raises(ConfigError, match=r"^data: max_pixels must be >= 1"):
        Config.from_dict(raw(data=data(max_pixels=0)))
    c = Config.from_dict(raw(run={"max_retries": 0, "seed": -5}))  # 0 retries and any seed are fine
    assert c.data.max_pixels == 64_000_000
    assert c.run.actor_timeout == 600.0


def test_actor_timeout_is_resumable_but_max_pixels_is_not():
    base = Config.from_dict(raw())
    slow = Config.from_dict(raw(run={"actor_timeout": 30}))
    assert base.result_hash() == slow.result_hash()
    assert diff_configs(base.to_dict(), slow.to_dict()) == []
    small = Config.from_dict(raw(data=data(max_pixels=1000)))
    assert base.result_hash() != small.result_hash()
    assert diff_configs(base.to_dict(), small.to_dict()) == ["data.max_pixels: 64000000 -> 1000"]


# -- duplicate YAML keys ---------------------------------------------------------------------------


def test_duplicate_yaml_key_is_refused_naming_key_and_line(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "data: {path: x}\n"
        "store: s.zarr\n"
        "methods: {saliency: {}}\n"
        "run: {seed: 1}\n"
        "methods: {integrated_gradients: {}}\n"
    )
    with pytest.raises(ConfigError, match=r"duplicate key 'methods' on line 5 \(first given on line 3\)"):
        Config.from_yaml(tmp_path / "job.yaml")


def test_duplicate_nested_yaml_key_is_refused(tmp_path):
    (tmp_path / "job.yaml").write_text("data:\n  path: x\n  image_size: 32\n  image_size: 64\nstore: s.zarr\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'image_size' on line 4"):
        Config.from_yaml(tmp_path / "job.yaml")
    (tmp_path / "job.yaml").write_text("data: {path: x, limit: 2, limit: 3}\nstore: s.zarr\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'limit' on line 1"):
        Config.from_yaml(tmp_path / "job.yaml")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "data: {path: x}\n"
        "store: s.zarr\n"
        "evaluators:\n"
        "  a: &m {kind: zoo, name: digits_cnn, num_classes: 10}\n"
        "  b: {<<: *m, num_classes: 5}\n"
    )
    c = Config.from_yaml(tmp_path / "job.yaml")
    assert (c.evaluators["a"].num_classes, c.evaluators["b"].num_classes) == (10, 5)


# -- resolved parameters ---------------------------------------------------------------------------


def test_stored_config_holds_resolved_method_and_metric_parameters():
    c = Config.from_dict(raw(methods={"integrated_gradients": {}, "smoothgrad": {"samples": 8}},
                             metrics={"feature_detection": {}, "deletion": {"steps": 5}}))
    d = c.to_dict()
    assert d["methods"]["integrated_gradients"] == {"steps": 32, "baseline": 0.0, "rule": "gausslegendre"}
    assert d["methods"]["smoothgrad"] == {"samples": 8, "noise_level": 0.15}
    assert d["metrics"]["feature_detection"]["keep"] == [0.05, 0.1, 0.2, 0.4]
    assert d["metrics"]["deletion"]["steps"] == 5
    assert d["metrics"]["deletion"]["baseline"] == "zero"
    # a default changed between versions would now show in the resume check
    old = dict(d, methods={**d["methods"], "integrated_gradients": {**d["methods"]["integrated_gradients"], "steps": 16}})
    assert diff_configs(old, d) == ["methods.integrated_gradients.steps: 16 -> 32"]


def test_round_trip_gives_an_equal_config_and_hash():
    c = Config.from_dict(raw(
        methods={"integrated_gradients": {"steps": 8}, "gradcam": {}, "saliency": {}},
        metrics={"feature_detection": {"keep": [0.1, 0.5]}, "mufidelity": {"baseline": 0}},
        filters={"sweep": [100, 50], "store_maps": [50]},
        run={"target": 3},
    ))
    again = Config.from_dict(c.to_dict())
    assert again == c
    assert again.result_hash() == c.result_hash()
    assert again.to_dict() == c.to_dict()
    assert again.metrics["feature_detection"]["keep"] == (0.1, 0.5)


# -- store path ------------------------------------------------------------------------------------


def test_moving_the_store_does_not_block_resuming():
    a = Config.from_dict(raw(store="old/place.zarr"))
    b = Config.from_dict(raw(store="/elsewhere/new.zarr"))
    assert a.result_hash() == b.result_hash()
    assert diff_configs(a.to_dict(), b.to_dict()) == []


# -- decompression bombs ---------------------------------------------------------------------------


def _png(w, h):
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_its_header():
    bomb = _png(10_000, 10_000)
    assert len(bomb) < 1_000_000
    cfg = DataConfig(format="folder", path="unused", image_size=32, channels=1, mean=[0.0], std=[1.0])
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"image of 10000x10000 = 100 MPix exceeds data\.max_pixels \(64000000\); "
                                         r"possible decompression bomb"):
        decode_image(bomb, cfg)
    assert time.perf_counter() - t0 < 2.0  # the header only: decoding 100 MPix would take far longer


def test_max_pixels_limits_encoded_and_raw_images_and_small_ones_decode():
    cfg = DataConfig(format="numpy", path="unused", image_size=16, channels=1, mean=[0.0], std=[1.0],
                     max_pixels=40 * 40)
    assert decode_image(_png(40, 40), cfg).shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"image of 41x40 = 0 MPix exceeds data\.max_pixels \(1600\)"):
        decode_image(_png(41, 40), cfg)
    assert decode_image(np.zeros((40, 40), np.uint8), cfg).shape == (1, 16, 16)
    for arr in (np.zeros((40, 50), np.uint8), np.zeros((40, 50, 3), np.uint8), np.zeros((3, 40, 50), np.float32)):
        with pytest.raises(ValueError, match=r"image of 50x40 = 0 MPix exceeds data\.max_pixels"):
            decode_image(arr, cfg)


def test_union_typed_parameters_are_checked():
    """``baseline: str | float`` (a ``types.UnionType``) used to skip the type check altogether,
    so a list or a mapping got through the config and failed inside a running unit."""
    with pytest.raises(ConfigError, match=r"metrics\.deletion\.baseline"):
        Config.from_dict(raw(metrics={"deletion": {"baseline": [1, 2]}}))
    with pytest.raises(ConfigError, match=r"metrics\.mufidelity\.baseline"):
        Config.from_dict(raw(metrics={"mufidelity": {"baseline": {"kind": "blur"}}}))
    cfg = Config.from_dict(raw(metrics={"deletion": {"baseline": 0}, "insertion": {"baseline": "blur"}}))
    assert cfg.metrics["deletion"]["baseline"] == 0.0 and cfg.metrics["insertion"]["baseline"] == "blur"


def test_metrics_say_output_like_methods_and_the_old_activation_still_reads(tmp_path, parquet_dir):
    """One word for the class score: methods and metrics both take ``output: probability|logit``.
    A config (or a store) written with the metrics' former ``activation: softmax|logit`` reads
    the same, with a warning; both names at once are refused; an old store resumes."""
    import zarr

    from distributed_attr.metrics import list_metrics
    from distributed_attr.methods import list_methods
    from distributed_attr.runner import run
    from tests.conftest import base_config

    takes_output = {n for n, d in {**list_metrics(), **list_methods()}.items() if "output" in d["params"]}
    assert {"deletion", "insertion", "forgrad_protocol", "mufidelity", "occlusion", "rise"} <= takes_output
    assert not [n for n, d in list_metrics().items() if "activation" in d["params"]]
    with pytest.warns(FutureWarning, match=r"metrics\.deletion\.activation: renamed to 'output'"):
        old = Config.from_dict(raw(metrics={"deletion": {"activation": "softmax"}, "mufidelity": {"activation": "logit"}}))
    assert old.metrics["deletion"]["output"] == "probability" and old.metrics["mufidelity"]["output"] == "logit"
    assert old.metrics == Config.from_dict(raw(metrics={"deletion": {}, "mufidelity": {"output": "logit"}})).metrics
    with pytest.raises(ConfigError, match=r"metrics\.deletion: 'activation' is the former name of 'output'"):
        Config.from_dict(raw(metrics={"deletion": {"activation": "softmax", "output": "logit"}}))
    with pytest.raises(ConfigError, match=r"metrics\.deletion\.activation: 'sigmoid' is not one of"):
        Config.from_dict(raw(metrics={"deletion": {"activation": "sigmoid"}}))

    # a store made before the rename: its stored config says activation; resuming it works
    cfg = base_config(parquet_dir, tmp_path / "old.zarr", unit_size=8)
    cfg["data"]["limit"] = 16
    cfg["methods"] = {"saliency": {}}
    cfg["metrics"] = {"deletion": {"steps": 2}}
    run(cfg, progress=False, _after_commit=lambda unit: (_ for _ in ()).throw(KeyboardInterrupt()))
    g = zarr.open_group(cfg["store"], mode="r+")
    stored = dict(g.attrs["config"])
    params = dict(stored["metrics"]["deletion"])
    params["activation"] = {"probability": "softmax", "logit": "logit"}[params.pop("output")]
    stored["metrics"] = {"deletion": params}
    g.attrs["config"] = stored
    summary = run(cfg, resume=True, progress=False)
    assert summary.units_done == 2


@pytest.mark.parametrize("method", ["soundness_saliency", "deeplift_shap"])
def test_backgrounds_per_image_were_called_references_and_still_read(method):
    """"references" meant the reference images (``run.references``, ``ctx.references``) and also
    how many of them a method draws per image; the latter is now ``backgrounds``. A config or a
    stored config with the former name reads the same, and an old store's config shows no
    difference on resume."""
    from distributed_attr.config import diff_configs, upgrade_stored_config

    with pytest.warns(FutureWarning, match=rf"methods\.{method}\.references: renamed to 'backgrounds'"):
        old = Config.from_dict(raw(methods={method: {"references": 4}}))
    new = Config.from_dict(raw(methods={method: {"backgrounds": 4}}))
    assert old.methods == new.methods and new.methods[method]["backgrounds"] == 4
    stored = new.to_dict()
    stored["methods"][method]["references"] = stored["methods"][method].pop("backgrounds")
    assert diff_configs(stored, new.to_dict())  # the old name differs as it is ...
    assert diff_configs(upgrade_stored_config(stored), new.to_dict()) == []  # ... and not once upgraded
