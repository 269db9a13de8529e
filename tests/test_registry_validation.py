"""Parameter validation by pydantic (``registry._coerce``): nested types are checked (list elements,
tuple lengths, mapping values), the inputs YAML gives are still accepted (lists for tuples, a
scalar for a one-element list, 3 for a float, 3.0 for an int), errors name the key path, and the
resolved config -- and so its hash, which decides whether a store may be resumed -- is unchanged.
Fast, no Ray, no torch work."""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Literal

import pytest

from distributed_attr.config import Config, ConfigError
from distributed_attr.registry import RegistryError, build_params
from tests.test_config_validation import data, raw  # the same minimal configs


@dataclasses.dataclass
class Nested:
    """Annotations no method or metric uses yet, which the hand-written checks let through."""

    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    groups: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    pairs: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    size: tuple[int, int] | None = None
    anything: Any = None
    hook: Callable[..., Any] | None = None
    options: dict = dataclasses.field(default_factory=dict)


# -- what the hand-written checks let through ------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    # dict[K, V]: the values were never looked at
    ({"weights": {"a": "x"}}, r"^where\.weights\.a: expected a number, got 'x'$"),
    ({"weights": {"a": True}}, r"^where\.weights\.a: expected a number, got True$"),
    ({"weights": ["a"]}, r"^where\.weights: expected a mapping of keys to values, got \['a'\]$"),
    ({"groups": {"a": [1, 2.5]}}, r"^where\.groups\.a\[1\]: expected an integer, got 2\.5$"),
    # a bare dict accepted anything
    ({"options": [1, 2]}, r"^where\.options: expected a mapping of keys to values, got \[1, 2\]$"),
    ({"options": "abc"}, r"^where\.options: expected a mapping of keys to values, got 'abc'$"),
])
def test_nested_values_the_old_checks_let_through_are_refused_naming_the_key(values, message):
    with pytest.raises(RegistryError, match=message):
        build_params(Nested, values, "where")


def test_a_list_where_model_kwargs_is_a_mapping_is_refused():
    # formerly accepted: the model's validate() iterated the list's items as keyword names
    with pytest.raises(ConfigError, match=r"^model\.kwargs: expected a mapping of keys to values, got \[1, 2\]$"):
        Config.from_dict(raw(model={"kind": "zoo", "kwargs": [1, 2]}))
    with pytest.raises(ConfigError, match=r"^evaluators\.b\.kwargs: expected a mapping"):
        Config.from_dict(raw(evaluators={"b": {"kind": "zoo", "kwargs": "dropout"}}))


def test_a_bool_is_not_a_channel_count():
    # formerly accepted (True in (1, 3)) and stored as `channels: true`
    with pytest.raises(ConfigError, match=r"^data\.channels: True is not one of \[1, 3\]$"):
        Config.from_dict(raw(data=data(channels=True)))
    # formerly stored as the float 3.0; now the int, as for every int field
    cfg = Config.from_dict(raw(data=data(channels=3.0, mean=[0.0], std=[1.0])))
    assert cfg.data.channels == 3 and type(cfg.data.channels) is int


def test_errors_inside_a_list_name_the_element():
    with pytest.raises(ConfigError, match=r"^filters\.sweep\[1\]: expected a number, got 'a'$"):
        Config.from_dict(raw(filters={"sweep": [10, "a"]}))
    with pytest.raises(ConfigError, match=r"^data\.mean\[0\]: expected a number, got True$"):
        Config.from_dict(raw(data=data(mean=[True])))
    with pytest.raises(ConfigError, match=r"^metrics\.feature_detection\.keep\[0\]: expected a number, got '10%'$"):
        Config.from_dict(raw(metrics={"feature_detection": {"keep": ["10%"]}}))
    with pytest.raises(RegistryError, match=r"^where\.pairs\[1\]: expected 2 values, got \[3\]$"):
        build_params(Nested, {"pairs": [[1, 2], [3]]}, "where")
    with pytest.raises(RegistryError, match=r"^where\.size\[1\]: expected an integer, got 'x'$"):
        build_params(Nested, {"size": [1, "x"]}, "where")


def test_a_list_given_for_a_number_or_list_parameter_reports_the_bad_element():
    # `float | list[float] | None`: formerly "methods.lrp.low: expected a number, got ['a']", the
    # float member's complaint about the whole list
    lrp = {"composite": "epsilon_gamma_box"}
    with pytest.raises(ConfigError, match=r"^methods\.lrp\.low\[0\]: expected a number, got 'a'$"):
        Config.from_dict(raw(methods={"lrp": {**lrp, "low": ["a"]}}))
    with pytest.raises(ConfigError, match=r"^methods\.lrp\.high: expected a number, got 'a'$"):
        Config.from_dict(raw(methods={"lrp": {**lrp, "high": "a"}}))
    # `str | tuple[str, ...]`: a scalar gets the first member's message, as before
    with pytest.raises(ConfigError, match=r"^metrics\.model_randomisation\.layers: expected a string, got 3$"):
        Config.from_dict(raw(metrics={"model_randomisation": {"layers": 3}}))
    # ... and a list its element's (formerly "expected a string, got [1, 2]")
    with pytest.raises(ConfigError, match=r"^metrics\.model_randomisation\.layers\[1\]: expected a string, got 2$"):
        Config.from_dict(raw(metrics={"model_randomisation": {"layers": ["a", 2]}}))


def test_a_scalar_for_a_list_is_checked_as_the_element():
    # `sweep: 15` reads as [15.0]; `sweep: "a"` is the field's error, not element [0]'s
    with pytest.raises(ConfigError, match=r"^filters\.sweep: expected a number, got 'a'$"):
        Config.from_dict(raw(filters={"sweep": "a"}))
    with pytest.raises(ConfigError, match=r"^metrics\.feature_detection\.keep: expected a number, got True$"):
        Config.from_dict(raw(metrics={"feature_detection": {"keep": True}}))
    assert Config.from_dict(raw(metrics={"feature_detection": {"keep": 0.5}})).metrics["feature_detection"]["keep"] == (0.5,)


@pytest.mark.parametrize("run, message", [
    ({"decode_workers": "x"}, r"^run\.decode_workers: expected an integer or 'auto', got 'x'$"),
    ({"decode_workers": True}, r"^run\.decode_workers: expected an integer or 'auto', got True$"),
    ({"gpus_per_worker": "one"}, r"^run\.gpus_per_worker: expected a number or 'auto', got 'one'$"),
    ({"target": "x"}, r"^run\.target: 'x' is not one of \['prediction', 'label'\] and not an integer$"),
    ({"target": 1.5}, r"^run\.target: 1\.5 is not one of \['prediction', 'label'\] and not an integer$"),
    # a value of the right kind but out of range keeps its own message
    ({"gpus_per_worker": 10**400}, r"^run\.gpus_per_worker: expected a finite number, got 1000"),
])
def test_a_union_of_plain_types_names_every_accepted_form(run, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(raw(run=run))


# -- what is still accepted, and how it is stored --------------------------------------------------


def test_yaml_shapes_are_accepted_and_stored_resolved():
    cfg = Config.from_dict(raw(
        data=data(image_size=64.0),
        filters={"sweep": 15, "store_maps": [15]},                  # a scalar for a list
        run={"cpus_per_worker": 2, "gpus_per_worker": 1, "unit_size": 64.0, "decode_workers": "auto",
             "target": 3.0, "actor_timeout": 30},
        methods={"lrp": {"composite": "epsilon_gamma_box", "low": 0, "high": [1, 2]}},
        metrics={"feature_detection": {"keep": [0.1, 1]}, "model_randomisation": {"layers": ["a", "b"]}},
    ))
    assert cfg.data.image_size == 64 and type(cfg.data.image_size) is int
    assert cfg.filters.sweep == [15.0] and type(cfg.filters.sweep[0]) is float
    assert type(cfg.run.cpus_per_worker) is float and type(cfg.run.gpus_per_worker) is float
    assert type(cfg.run.unit_size) is int and cfg.run.decode_workers == "auto"
    assert cfg.run.target == 3 and type(cfg.run.target) is int
    assert cfg.run.actor_timeout == 30.0 and type(cfg.run.actor_timeout) is float
    assert cfg.methods["lrp"]["low"] == 0.0 and type(cfg.methods["lrp"]["low"]) is float
    assert cfg.methods["lrp"]["high"] == [1.0, 2.0] and all(type(v) is float for v in cfg.methods["lrp"]["high"])
    # a list where a tuple is annotated becomes the tuple (a list again in the stored JSON)
    assert cfg.metrics["feature_detection"]["keep"] == (0.1, 1.0)
    assert cfg.metrics["model_randomisation"]["layers"] == ("a", "b")
    assert cfg.to_dict()["metrics"]["feature_detection"]["keep"] == [0.1, 1.0]


def test_the_python_api_shapes_are_accepted():
    hook, thing = (lambda x: x), object()
    mapping = types.MappingProxyType({"a": 1})
    p = build_params(Nested, {"size": (3, 4.0), "anything": thing, "hook": hook, "options": mapping,
                              "weights": {"a": 1}, "pairs": [(1, 2), [3, 4]]}, "where")
    assert p.size == (3, 4) and type(p.size[1]) is int
    assert p.anything is thing and p.hook is hook and p.options is mapping
    assert p.weights == {"a": 1.0} and type(p.weights["a"]) is float
    assert p.pairs == [(1, 2), (3, 4)]
    assert build_params(Nested, {"size": None, "hook": None}, "where").size is None
    with pytest.raises(RegistryError, match=r"^where\.size: expected 2 values, got \[5\]$"):
        build_params(Nested, {"size": 5}, "where")
    with pytest.raises(RegistryError, match=r"^where\.size: expected 2 values, got \[1, 2, 3\]$"):
        build_params(Nested, {"size": [1, 2, 3]}, "where")


@pytest.mark.parametrize("section, values, message", [
    ("run", {"seed": True}, r"^run\.seed: expected an integer, got True$"),
    ("run", {"seed": "3"}, r"^run\.seed: expected an integer, got '3'$"),
    ("run", {"seed": 2.5}, r"^run\.seed: expected an integer, got 2\.5$"),
    ("run", {"seed": None}, r"^run\.seed: expected an integer, got None$"),
    ("spectra", {"hf_cutoff": True}, r"^spectra\.hf_cutoff: expected a number, got True$"),
    ("spectra", {"hf_cutoff": "0.2"}, r"^spectra\.hf_cutoff: expected a number, got '0\.2'$"),
    ("spectra", {"enabled": "yes"}, r"^spectra\.enabled: expected true or false, got 'yes'$"),
    ("spectra", {"enabled": 1}, r"^spectra\.enabled: expected true or false, got 1$"),
    ("data", data(path=None), r"^data\.path: expected a string, got None$"),
    ("data", data(format="parq"), r"^data\.format: 'parq' is not one of \[[^]]*'parquet'[^]]*\]$"),  # every source
    ("data", data(limit="10"), r"^data\.limit: expected an integer, got '10'$"),
    ("run", {"actor_timeout": 10**400}, r"^run\.actor_timeout: expected a finite number, got 1000"),
    ("run", {"autocast": None}, r"^run\.autocast: None is not one of \['none', 'bfloat16', 'float16'\]$"),
])
def test_no_strings_for_numbers_no_bools_for_ints_none_only_where_optional(section, values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(raw(**{section: values}))


def test_none_is_accepted_where_the_annotation_allows_it():
    cfg = Config.from_dict(raw(data=data(limit=None, mask_column=None), model={"weights": None}))
    assert cfg.data.limit is None and cfg.model.weights is None


# -- the resolved config and its hash --------------------------------------------------------------

# The demo's methods and metrics (distributed_attr.demo, copied so that this test pins its inputs)
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "saliency": {}, "gradient_x_input": {}, "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 16}, "vargrad": {"samples": 16}, "squaregrad": {"samples": 16},
    "guided_backprop": {}, "gradcam": {}, "gradcam_pp": {}, "occlusion": {"patch": 4, "stride": 4},
    "rise": {"masks": 200, "grid": 4}, "sobol": {"grid": 4, "design": 8},
    "soundness_saliency": {"steps": 30, "backgrounds": 4}, "lrp": {},
}
DEMO_METRICS: dict[str, dict[str, Any]] = {
    "forgrad_protocol": {"steps": 10, "blur_size": 5, "blur_sigma": 2.0},
    "mufidelity": {"grid": 4, "n_subsets": 16}, "feature_detection": {"keep": [0.1, 0.3]},
    "sparseness": {}, "complexity": {},
}


def typical_config() -> dict[str, Any]:
    """The demo's job, with fixed paths."""
    return {
        "data": {"format": "parquet", "path": "data", "image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
        "store": "out/digits.zarr",
        "model": {"kind": "zoo", "name": "digits_cnn", "weights": "w.pt"},
        "methods": DEMO_METHODS,
        "spectra": {"enabled": True, "hf_cutoff": 0.25},
        "filters": {"kind": "forgrad", "sweep": [100, 50], "reference_size": 224, "store_maps": [100, 50]},
        "metrics": DEMO_METRICS,
        "evaluators": {"digits_vgg": {"kind": "zoo", "name": "digits_vgg", "weights": "v.pt"}},
        "run": {"num_workers": 2, "unit_size": 32, "batch_size": 32, "seed": 0},
    }


def coerced_config() -> dict[str, Any]:
    """Every conversion YAML relies on: ints for floats, integral floats for ints, a scalar for a
    list, lists for tuples, numbers in unions."""
    return {
        "data": {"path": "data", "image_size": 64.0, "channels": 3, "mean": [0, 0.5, 1], "std": 1},
        "store": "s.zarr",
        "model": {"kind": "torchvision", "name": "resnet18", "num_classes": 10, "kwargs": {"dropout": 0.1}},
        "methods": {"lrp": {"composite": "epsilon_gamma_box", "low": 0, "high": [1, 2, 3]},
                    "gradcam": {"reshape": 7}, "integrated_gradients": {"steps": 8.0, "baseline": 0}},
        "spectra": {"hf_cutoff": 0.2},
        "filters": {"sweep": 15, "store_maps": [15], "order": 4.0},
        "metrics": {"feature_detection": {"keep": [0.1, 1]}, "model_randomisation": {"layers": ["a", "b"]},
                    "deletion": {"baseline": 0}},
        "run": {"gpus_per_worker": 1, "cpus_per_worker": 2, "target": 3, "decode_workers": 2.0,
                "unit_size": 64.0, "seed": 7.0, "actor_timeout": 30},
    }


@pytest.mark.parametrize("make, expected", [
    # Computed by the hand-written ``_coerce`` this validation replaced. A store records the hash
    # of its resolved config (``inspect`` shows it), and the resume check compares the resolved
    # configs themselves: a change in how values are resolved (3 stored as 3.0, a tuple as
    # something else than a list) would make every existing store look like another job's. If a
    # parameter was renamed or a default changed on purpose, this changes too: update the value
    # and say why here. 2026-11-30: soundness_saliency's "references" became "backgrounds"
    # (54149bf465381635 before; old stores still resume, see test_config_validation).
    # 2026-12-08: the decoding settings data.exif_orientation and data.alpha_background are part
    # of the resolved config (they change the pixels of rotated and transparent images); without
    # those two keys the hashes are the former fde7c7169766173b and b38b453e635bad67 (checked).
    (typical_config, "42e8792a1bd7026a"),
    (coerced_config, "82858912380d7072"),
])
def test_the_config_hash_of_existing_configs_is_unchanged(make, expected, recwarn):
    assert Config.from_dict(make()).result_hash() == expected


def test_resolved_values_keep_their_json_types():
    out = Config.from_dict(coerced_config()).to_dict()
    assert out["data"]["image_size"] == 64 and isinstance(out["data"]["image_size"], int)
    assert out["data"]["mean"] == [0.0, 0.5, 1.0] and all(isinstance(v, float) for v in out["data"]["mean"])
    assert out["data"]["std"] == [1.0]
    assert out["filters"]["sweep"] == [15.0] and out["filters"]["order"] == 4
    assert isinstance(out["run"]["gpus_per_worker"], float) and isinstance(out["run"]["seed"], int)
    assert out["methods"]["lrp"]["high"] == [1.0, 2.0, 3.0] and out["methods"]["gradcam"]["reshape"] == 7
    assert out["metrics"]["feature_detection"]["keep"] == [0.1, 1.0]
    assert out["metrics"]["deletion"]["baseline"] == 0.0 and isinstance(out["metrics"]["deletion"]["baseline"], float)


def test_literal_members_keep_their_values():
    # `Literal[...] | int`: a string in the Literal is kept as is, an int as an int
    for value in ("auto", "nhwc", 4):
        cfg = Config.from_dict(raw(methods={"gradcam": {"reshape": value}}))
        assert cfg.methods["gradcam"]["reshape"] == value
    assert Config.from_dict(raw(run={"target": "label"})).run.target == "label"
    for bad in ("flat", True):
        with pytest.raises(ConfigError, match=r"^methods\.gradcam\.reshape: .* is not one of \['auto', 'nchw', "
                                              r"'nhwc', 'tokens'\] and not an integer$"):
            Config.from_dict(raw(methods={"gradcam": {"reshape": bad}}))


def test_a_literal_of_strings_refuses_other_types():
    with pytest.raises(RegistryError, match=r"^where\.kind: 1 is not one of \['a', 'b'\]$"):
        build_params(_Kind, {"kind": 1}, "where")
    with pytest.raises(RegistryError, match=r"^where\.kind: \['a'\] is not one of \['a', 'b'\]$"):
        build_params(_Kind, {"kind": ["a"]}, "where")


@dataclasses.dataclass
class _Kind:
    kind: Literal["a", "b"] = "a"
