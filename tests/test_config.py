import pytest

from distributed_attr.config import Config, ConfigError


def cfg(**over):
    raw = {"data": {"path": "x", "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]}, "store": "s.zarr"}
    for k, v in over.items():
        raw[k] = v
    return raw


def test_unknown_section_names_it_and_lists_valid():
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['dtaa'\].*valid sections"):
        Config.from_dict({**cfg(), "dtaa": {}})


def test_bad_enum_value_names_key_and_allowed_values():
    import re

    from distributed_attr.io.sources import SOURCES

    formats = SOURCES.names()  # the registered sources: a new one is listed without editing this test
    assert {"folder", "numpy", "parquet", "webdataset"} <= set(formats)
    with pytest.raises(ConfigError, match=r"data\.format: 'parq' is not one of " + re.escape(str(formats))):
        Config.from_dict(cfg(data={"path": "x", "format": "parq"}))


def test_unknown_key_in_section_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"run: unknown parameter\(s\) \['workers'\].*num_workers="):
        Config.from_dict(cfg(run={"workers": 2}))


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"run\.batch_size: expected an integer"):
        Config.from_dict(cfg(run={"batch_size": "big"}))


def test_unknown_method_lists_methods():
    with pytest.raises(ConfigError, match=r"unknown method 'salency'; valid methods: \[.*'saliency'"):
        Config.from_dict(cfg(methods={"salency": {}}))


def test_unknown_method_parameter_lists_parameters():
    with pytest.raises(ConfigError, match=r"methods\.integrated_gradients: unknown parameter\(s\) \['n_steps'\].*steps=32"):
        Config.from_dict(cfg(methods={"integrated_gradients": {"n_steps": 8}}))


def test_missing_required_and_semantic_checks():
    with pytest.raises(ConfigError, match=r"^store: required"):
        Config.from_dict({"data": {"path": "x"}})
    with pytest.raises(ConfigError, match=r"data: mean needs 1 or 3 values"):
        Config.from_dict({"data": {"path": "x", "mean": [0.1, 0.2]}, "store": "s"})
    with pytest.raises(ConfigError, match=r"filters: store_maps \[9.0\] are not in the sweep"):
        Config.from_dict(cfg(filters={"sweep": [15], "store_maps": [9]}))


def test_hash_ignores_speed_settings_but_not_results():
    a = Config.from_dict(cfg(run={"num_workers": 1}))
    b = Config.from_dict(cfg(run={"num_workers": 8, "batch_size": 4}))
    c = Config.from_dict(cfg(run={"seed": 1}))
    assert a.result_hash() == b.result_hash()
    assert a.result_hash() != c.result_hash()


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "job.yaml").write_text("data: {path: shards, image_size: 32}\nstore: out/a.zarr\n")
    c = Config.from_yaml(tmp_path / "job.yaml")
    assert c.data.path == str(tmp_path / "shards")
    assert c.store == str(tmp_path / "out" / "a.zarr")


def test_cutoffs_scale_with_image_size():
    c = Config.from_dict(cfg(filters={"sweep": [224, 15]}))
    assert c.cutoffs()[0] == float("inf")
    assert c.cutoffs()[1:] == pytest.approx([32.0, 15 * 32 / 224])
