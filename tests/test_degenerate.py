"""Degenerate maps (all zero, constant, non-finite) are flagged per image, counted per method and
warned about; the choices methods make for the user (CAM layer and grid, LRP's canonizer, the
attention's token grid) are recorded, printed, and compared on resume."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from distributed_attr.methods import attribute, build_method
from distributed_attr.methods.choices import coarse_grid_warnings, describe_choice, resolve_choices
from distributed_attr.methods.degenerate import (
    ALL_ZERO,
    CONSTANT,
    CONSTANT_ULPS,
    FLAGS,
    NON_FINITE,
    degenerate_flags,
    flag_names,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SUPPORT = str(Path(__file__).resolve().parent / "support")
EPS = torch.finfo(torch.float32).eps


# -- the classifier, on closed-form maps ---------------------------------------------------------

def test_each_kind_of_map_gets_its_flags():
    nan, inf = float("nan"), float("inf")
    ramp = torch.arange(16, dtype=torch.float32).view(4, 4)
    maps = torch.stack([
        torch.zeros(4, 4),                                    # all zero
        torch.full((4, 4), -3.5),                             # constant, negative
        ramp,                                                 # ordinary
        torch.zeros(4, 4).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(nan)),  # NaN among zeros
        torch.full((4, 4), nan),                              # nothing finite
        ramp.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(inf)),     # inf in a ramp
        torch.full((4, 4), 2.0).index_put_((torch.tensor([3]), torch.tensor([3])), torch.tensor(-inf)),  # inf + constant
        -torch.zeros(4, 4),                                   # negative zeros are zeros
    ])
    flags = degenerate_flags(maps)
    assert flags.dtype == torch.uint8 and flags.shape == (8,)
    assert flags.tolist() == [ALL_ZERO, CONSTANT, 0, NON_FINITE | ALL_ZERO, NON_FINITE, NON_FINITE,
                              NON_FINITE | CONSTANT, ALL_ZERO]
    assert FLAGS == {"all_zero": 1, "constant": 2, "non_finite": 4}
    assert flag_names(5) == ["all_zero", "non_finite"] and flag_names(0) == []


def test_constant_means_within_a_few_roundings_of_the_value():
    """The tolerance is CONSTANT_ULPS machine epsilons of the value: 1 and 1 + 16 eps (exact in
    float32) are one constant, 1 and 1 + 17 eps are not; a relative spread of 1e-5 is a real map;
    the same holds at any scale."""
    def pair(a, b):
        m = torch.full((1, 2, 2), a, dtype=torch.float32)
        m[0, 1, 1] = b
        return m

    assert CONSTANT_ULPS == 16
    at = pair(1.0, 1.0 + CONSTANT_ULPS * EPS)
    above = pair(1.0, 1.0 + (CONSTANT_ULPS + 1) * EPS)
    assert (at[0, 1, 1] - at[0, 0, 0]).item() == CONSTANT_ULPS * EPS  # exactly representable
    assert degenerate_flags(at).item() == CONSTANT
    assert degenerate_flags(above).item() == 0
    assert degenerate_flags(pair(1.0, 1.00001)).item() == 0
    assert degenerate_flags(pair(1e-30, 1e-30 * (1 + 8 * EPS))).item() == CONSTANT
    assert degenerate_flags(pair(1e-30, 2e-30)).item() == 0
    # float16 maps: their own epsilon
    h = pair(1.0, 1.0).half()
    h[0, 1, 1] = 1.0 + float(torch.finfo(torch.float16).eps)
    assert degenerate_flags(h).item() == CONSTANT


def test_the_flags_hold_for_every_map_of_a_batch_alone():
    """Per image, whatever else is in the batch, for (N, H, W) and (N, C, H, W) maps alike."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 3, 5, 5, generator=g)
    maps[1] = 0
    maps[4] = 7.25
    maps[5, 2, 4, 4] = float("nan")
    expected = [0, ALL_ZERO, 0, 0, CONSTANT, NON_FINITE]
    assert degenerate_flags(maps).tolist() == expected
    assert [degenerate_flags(maps[i:i + 1]).item() for i in range(6)] == expected
    assert degenerate_flags(maps[:, 0]).tolist() == [0, ALL_ZERO, 0, 0, CONSTANT, 0]


def test_a_vit_with_its_zero_initialised_head_gives_all_zero_gradient_maps():
    """torchvision starts a ViT's head at zero: every logit is 0 (probability 0.1 for 10 classes)
    and every gradient map is exactly zero, which the flags say; attention rollout (forward only)
    is not touched by the head."""
    from distributed_attr import zoo

    model = zoo.DigitsViT().eval()
    assert not model.vit.heads.head.weight.any()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(torch.softmax(model(x), 1), torch.full((3, 10), 0.1))
    for method in ("saliency", "gradcam", "attention_relevance", "integrated_gradients"):
        maps = attribute(model, x, method, 0, **({"steps": 4} if method == "integrated_gradients" else {}))
        assert degenerate_flags(maps).tolist() == [ALL_ZERO] * 3, method
    assert degenerate_flags(attribute(model, x, "attention_rollout", 0)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("value", [-0.01, 1.5])
def test_the_warning_fraction_is_a_fraction(value):
    from distributed_attr.config import Config, ConfigError

    raw = {"data": {"format": "numpy", "path": "x.npy"}, "store": "s.zarr", "run": {"degenerate_warn_fraction": value}}
    with pytest.raises(ConfigError, match=r"run: degenerate_warn_fraction must lie in \[0, 1\]"):
        Config.from_dict(raw)
    raw["run"]["degenerate_warn_fraction"] = 0.0
    assert Config.from_dict(raw).run.degenerate_warn_fraction == 0.0


# -- the choices ---------------------------------------------------------------------------------

def methods(**params):
    return [build_method(name, p) for name, p in params.items()]


def test_the_choices_are_the_layer_grid_canonizer_and_token_grid_the_methods_use():
    from distributed_attr import zoo

    x = torch.zeros(1, 1, 32, 32)
    cnn = zoo.build("digits_cnn").eval()
    got = resolve_choices(cnn, methods(saliency={}, gradcam={}, lrp={}), x)
    assert got == {
        "gradcam": {"layer": "features", "layout": "nchw", "grid": [8, 8], "chosen": "automatically"},
        "lrp": {"canonizer": "sequential_merge_batchnorm", "chosen": "automatically"},
    }
    assert describe_choice("gradcam", got["gradcam"]) == "gradcam: layer features (chosen automatically; 8x8 grid)"
    assert describe_choice("lrp", got["lrp"]) == "lrp: canonizer sequential_merge_batchnorm (chosen automatically)"
    # a layer set by one CAM method is the batch context's layer for the other (the pipeline's rule)
    got = resolve_choices(cnn, methods(gradcam={"layer": "features.5"}, gradcam_pp={}, lrp={"canonizer": "none"}), x)
    assert got["gradcam"] == {"layer": "features.5", "layout": "nchw", "grid": [16, 16],
                              "chosen": "methods.gradcam.layer"}
    assert got["gradcam_pp"] == {**got["gradcam"], "chosen": "methods.gradcam.layer"}
    assert got["lrp"] == {"canonizer": "none", "chosen": "methods.lrp.canonizer"}
    assert resolve_choices(zoo.build("digits_resnet"), methods(lrp={}), x)["lrp"]["canonizer"] == "digits_resnet"

    vit = zoo.DigitsViT().eval()
    got = resolve_choices(vit, methods(gradcam={}, attention_rollout={}, attention_relevance={"prefix_tokens": 1}), x)
    assert got["gradcam"] == {"layer": "vit.encoder.layers.encoder_layer_2.ln_1", "layout": "tokens", "grid": [8, 8],
                              "prefix_tokens": 1, "chosen": "automatically"}
    assert got["attention_rollout"] == {"tokens": 65, "prefix_tokens": 1, "grid": [8, 8], "chosen": "automatically"}
    assert got["attention_relevance"]["chosen"] == "methods.attention_relevance.prefix_tokens"
    assert describe_choice("gradcam", got["gradcam"]) == (
        "gradcam: layer vit.encoder.layers.encoder_layer_2.ln_1 (chosen automatically; 8x8 grid of tokens after "
        "1 leading token)")
    assert describe_choice("attention_rollout", got["attention_rollout"]) == (
        "attention_rollout: 8x8 patch grid after 1 leading token of 65 (chosen automatically)")


def small_cnn() -> nn.Module:
    """16 px in; an 8x8 stage, then a 2x2 adaptive pool that the automatic CAM layer picks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_a_cam_grid_under_4x4_warns_naming_method_layer_grid_and_a_finer_layer(capsys):
    from distributed_attr.config import Config
    from distributed_attr.runner import resolve_method_choices

    cfg = Config.from_dict({"data": {"format": "numpy", "path": "x.npy", "image_size": 16, "channels": 1,
                                     "mean": [0.0], "std": [1.0]},
                            "store": "s.zarr", "methods": {"saliency": {}, "gradcam": {}}})
    probe = SimpleNamespace(model=small_cnn(), methods=[build_method(n, p) for n, p in cfg.methods.items()])
    choices, warnings = resolve_method_choices(cfg, probe)
    assert choices == {"gradcam": {"layer": "4", "layout": "nchw", "grid": [2, 2], "chosen": "automatically"}}
    assert len(warnings) == 1
    w = warnings[0]
    assert (w["kind"], w["method"], w["layer"], w["grid"]) == ("coarse_grid", "gradcam", "4", [2, 2])
    assert "2x2 grid, smaller than 4x4" in w["message"] and "methods.gradcam.layer" in w["message"]
    assert "e.g. '3' (8x8)" in w["message"]
    err = capsys.readouterr().err.splitlines()
    assert "gradcam: layer 4 (chosen automatically; 2x2 grid)" in err
    assert f"warning: {w['message']}" in err
    # the finer layer named: no warning
    fine = resolve_choices(probe.model, methods(gradcam={"layer": "3"}), torch.zeros(1, 1, 16, 16))
    assert coarse_grid_warnings(probe.model, torch.zeros(1, 1, 16, 16), fine) == []


def test_a_layer_that_is_not_in_the_model_fails_before_the_store_exists(tmp_path, parquet_dir, make_config):
    from distributed_attr.runner import JobError, run

    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    cfg["methods"] = {"gradcam": {"layer": "features.99"}}
    with pytest.raises(JobError, match=r"methods.gradcam.layer: layer 'features.99' is not a submodule"):
        run(cfg, progress=False)
    assert not (tmp_path / "s.zarr").exists()


# -- through the job -----------------------------------------------------------------------------

@pytest.fixture
def zero_head_job(tmp_path, parquet_dir, make_config, monkeypatch):
    monkeypatch.syspath_prepend(SUPPORT)
    cfg = make_config(parquet_dir, tmp_path / "zero.zarr", unit_size=8)
    cfg["data"]["limit"] = 16
    cfg["model"] = {"kind": "callable", "name": "fault_models:zero_head_digits"}
    cfg["methods"] = {"saliency": {}, "gradcam": {}}
    return cfg


def test_a_zero_head_is_flagged_counted_warned_and_shown(zero_head_job, tmp_path, capsys):
    from distributed_attr.inspect import describe_store, format_description
    from distributed_attr.io.store import AttributionStore, Keys
    from distributed_attr.report import write_report
    from distributed_attr.runner import run

    cfg = zero_head_job
    summary = run(cfg, progress=False)
    err = capsys.readouterr().err
    assert "gradcam: layer features (chosen automatically; 8x8 grid)" in err.splitlines()
    assert summary.units_done == 2 and not summary.failures  # the job itself succeeded
    g = zarr.open_group(cfg["store"], mode="r")
    np.testing.assert_allclose(g["probability"][:], 0.1, rtol=1e-6)
    for m in ("saliency", "gradcam"):
        flags = g[Keys.degenerate(m)]
        assert flags.dtype == np.uint8 and flags.attrs["flags"] == FLAGS
        assert (flags[:] == ALL_ZERO).all(), m
        assert not g[Keys.maps(m)][:].any(), m
    assert summary.degenerate == {m: {"maps": 16, "degenerate": 16, "all_zero": 16, "constant": 0, "non_finite": 0}
                                  for m in ("saliency", "gradcam")}
    text = str(summary)
    assert "  saliency: 16 all-zero, 0 constant, 0 non-finite of 16" in text
    assert "  gradcam: 16 all-zero, 0 constant, 0 non-finite of 16" in text
    warns = [line for line in text.splitlines() if line.startswith("warning: ")]
    assert len(warns) == 2 and all("16 of 16 maps (100%) are degenerate" in w for w in warns)
    assert all("the target's gradient is zero for these images: a zero-initialised or untrained classifier head" in w
               for w in warns)
    # recorded: the resolved choices and the warnings
    assert g.attrs["resolved"]["methods"] == {
        "gradcam": {"layer": "features", "layout": "nchw", "grid": [8, 8], "chosen": "automatically"}}
    assert g.attrs["config"]["methods"]["gradcam"]["layer"] is None  # the config keeps what the user wrote
    assert [(w["kind"], w["method"]) for w in g.attrs["warnings"]] == [("degenerate_maps", "saliency"),
                                                                      ("degenerate_maps", "gradcam")]
    # inspect and the report show them
    info = describe_store(cfg["store"])
    assert info["degenerate"] == summary.degenerate
    shown = format_description(info)
    assert "degenerate  saliency: 16 all-zero, 0 constant, 0 non-finite of 16 maps" in shown
    assert "choices     gradcam: layer features (chosen automatically; 8x8 grid)" in shown
    assert shown.count("warning     ") == 2
    html = write_report(cfg["store"], out_dir=str(tmp_path / "out")).read_text()
    assert "<h3>Degenerate maps</h3>" in html
    assert "<tr><td>saliency</td><td>16</td><td>16</td><td>0</td><td>0</td></tr>" in html
    assert "gradcam: layer features (chosen automatically; 8x8 grid)" in html
    assert "the target&#x27;s gradient is zero for these images" in html

    # an unchanged config resumes (the recorded choice is compared, and equal); a changed warning
    # fraction is allowed and recomputes the warnings
    again = run({**cfg, "run": {**cfg["run"], "degenerate_warn_fraction": 1.0}}, progress=False, resume=True)
    assert again.units_this_run == 0 and again.warnings == []
    assert again.degenerate == summary.degenerate  # counted over the whole store, not this run
    assert zarr.open_group(cfg["store"], mode="r").attrs["warnings"] == []

    # an automatic choice that differs from the recorded one (another version) refuses the resume
    store = AttributionStore.open(cfg["store"])
    resolved = store.attrs["resolved"]
    resolved["methods"]["gradcam"]["layer"] = "features.11"
    store.set_attrs(resolved=resolved)
    from distributed_attr.io.store import StoreError

    with pytest.raises(StoreError, match=r"resolved\.methods\.gradcam\.layer: 'features.11' -> 'features' "
                                         r"\(chosen for you"):
        run(cfg, progress=False, resume=True)


def test_a_store_without_the_flag_arrays_resumes_and_says_they_are_not_recorded(zero_head_job, make_config):
    """A store made before 1.3: no ``degenerate/`` group and no ``resolved`` attribute."""
    import shutil

    from distributed_attr.inspect import describe_store, format_description
    from distributed_attr.io.store import AttributionStore
    from distributed_attr.runner import run

    cfg = zero_head_job
    cfg["methods"] = {"saliency": {}}
    run(cfg, progress=False)
    shutil.rmtree(Path(cfg["store"]) / "degenerate")
    g = zarr.open_group(cfg["store"], mode="r+")
    g.attrs["schema_version"] = "1.2"  # (a 1.3 store without its flag arrays is damaged)
    store = AttributionStore.open(cfg["store"])
    attrs = store.attrs
    del attrs["resolved"], attrs["warnings"]
    store.group.attrs.clear()
    store.group.attrs.update(attrs)
    store.mark_not_done({1: "test"})
    summary = run(cfg, progress=False, resume=True)
    assert summary.units_this_run == 1 and summary.degenerate == {} and summary.warnings == []
    assert "degenerate  not recorded (a store made before schema 1.3)" in format_description(describe_store(cfg["store"]))


def test_the_flags_describe_the_map_as_stored(tmp_path, parquet_dir, zoo_cnn):
    """Maps are stored as float16 by default: a map under its range is stored as zeros, one above
    it as inf. Before, the flags were computed on the float32 map (0: "ordinary") while the store
    held all-zero or non-finite maps."""
    import torch
    from conftest import saliency_only

    from distributed_attr.config import Config
    from distributed_attr.pipeline import UnitProcessor
    from distributed_attr.runner import prepare_store

    model, _ = zoo_cnn
    scaled = {}
    for name, scale in (("tiny", 1e-12), ("huge", 1e9)):
        class Scaled(torch.nn.Module):
            def __init__(self, inner, s):
                super().__init__()
                self.inner, self.s = inner, s

            def forward(self, x):
                return self.inner(x) * self.s

        cfg = saliency_only(parquet_dir, tmp_path / f"{name}.zarr", decode_workers=0)
        cfg["data"]["limit"] = 8
        cfg["run"]["target"] = "label"
        cfg = Config.from_dict(cfg)
        _, _, lease = prepare_store(cfg, resume=False, overwrite=False)
        lease.release()
        proc = UnitProcessor(cfg, device="cpu", model=Scaled(model, scale).eval())
        list(proc.process_units([0]))
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
        scaled[name] = (g["maps/saliency"][:], g["degenerate/saliency"][:])  # (saliency: the logit's gradient)
    maps, flags = scaled["tiny"]
    assert not maps.any() and flags.tolist() == [ALL_ZERO] * 8
    maps, flags = scaled["huge"]
    assert not np.isfinite(maps).all() and all(f & NON_FINITE for f in flags.tolist())
