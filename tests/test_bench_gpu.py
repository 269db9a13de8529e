"""``bench/gpu.py --smoke``: the GPU benchmark's code paths on the CPU (tiny models, one Ray actor).

Runs the script as a user would, then checks its JSON: every expected row is there, the numbers
are real (positive, finite, from the timed calls), every ratio is the one its rows give, and the
job rows wrote stores holding every image.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny_resnet", "tiny_vit")
DTYPES = ("float32", "bfloat16")
METHODS = ("saliency", "gradcam", "integrated_gradients (32 steps)", "smoothgrad (16 samples)",
           "occlusion (16 px, stride 8)")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_gpu")
    out = tmp / "bench.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--json", str(out), "--workdir", str(tmp / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def expected_ids(settings: dict) -> set[str]:
    b, m, masks = settings["batch"], settings["max_batch"], settings["rise_masks"]
    ids = set()
    for model in MODELS:
        for d in DTYPES:
            names = [f"bare fwd+bwd (batch {b})", f"bare fwd+bwd (batch {m})", f"bare fwd (batch {m})",
                     f"ours rise ({masks} masks)", f"bare saliency loop (batch {b}, in memory)",
                     "job, in-process (num_workers 0)"]
            names += [f"{who} {meth}" for meth in METHODS for who in ("ours", "Captum")]
            ids |= {f"{model}/{d}/{n}" for n in names}
    ids.add("tiny_resnet/bfloat16/job, 1 CPU actor")  # the Ray path: first model, bfloat16
    return ids


@pytest.mark.ray
def test_smoke_run_has_every_row_with_real_numbers(smoke):
    data, stdout = smoke
    rows = data["rows"]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert set(ids) == expected_ids(data["settings"])
    assert data["smoke"] and data["environment"]["device"] == "cpu" and data["environment"]["date"]
    assert 0 < data["total_wall_seconds"] < 300

    for r in rows:
        if r["na"]:  # Grad-CAM on the ViT: no grid layer (before issue 13), or none Captum takes
            assert r["model"] == "tiny_vit" and r["name"].endswith("gradcam"), r["id"]
            assert r["error"].startswith("n/a") and r["images_per_s"] is None
            continue
        assert r["error"] is None, (r["id"], r["error"])
        ips = r["images_per_s"]
        assert isinstance(ips, float) and math.isfinite(ips) and ips > 0, r["id"]
        if r["section"] == "job":
            continue
        # micro rows: images/s is images per call over the median timed call, after a warm-up; at
        # least min_reps calls unless one call takes over a second (a loaded machine)
        slow = r["warmup_seconds"] > max(1.0, data["settings"]["budget_s"])
        assert r["reps"] >= (1 if slow else data["settings"]["min_reps"]), r["id"]
        assert len(r["call_seconds"]) == r["reps"], r["id"]
        assert all(t > 0 for t in r["call_seconds"])
        assert ips == pytest.approx(r["images_per_call"] / statistics.median(r["call_seconds"]), rel=1e-3)
        assert r["passes_per_image"] >= 1 and 1 <= r["images_per_call"] <= data["settings"]["max_batch"]
    # Captum's LayerGradCam takes (N, K, h, w) layers only: never the ViT's; ours runs on the
    # token layer resolve_layer picks since issue 13, and says which layer in the notes
    na = {r["id"] for r in rows if r["na"]}
    captum_vit = {f"tiny_vit/{d}/Captum gradcam" for d in DTYPES}
    ours_vit = {f"tiny_vit/{d}/ours gradcam" for d in DTYPES}
    assert na in (captum_vit, captum_vit | ours_vit)
    for r in rows:
        if r["name"] == "ours gradcam" and not r["na"]:
            assert r["notes"].startswith("layer "), r["id"]
        if r["id"] in ours_vit and r["na"]:
            assert "issue 13" in r["error"]

    # the markdown table: one line per row, the header and the rule
    table = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert len(table) == len(rows) + 2
    assert "total wall time:" in stdout and "SMOKE RUN" in stdout


@pytest.mark.ray
def test_smoke_ratios_follow_from_the_rows(smoke):
    data, _ = smoke
    by_id = {r["id"]: r for r in data["rows"]}
    checked = {"bare": 0, "captum": 0, "bf16": 0}
    for r in data["rows"]:
        if r["images_per_s"] is None:
            assert r["ratio_to_bare"] is None and r["ours_over_captum"] is None
            continue
        ref = by_id[r["bare_row"]] if r["bare_row"] else None
        if r["section"] in ("ours", "captum"):
            assert ref["section"] == "bare"
            # one-pass methods against batch `batch`, multi-pass against `max_batch`, occlusion/RISE: forward
            if r.get("method") in ("occlusion", "rise"):
                assert ref["name"].startswith("bare fwd (")
            elif r["passes_per_image"] == 1:
                assert ref["name"] == f"bare fwd+bwd (batch {data['settings']['batch']})"
            else:
                assert ref["name"] == f"bare fwd+bwd (batch {data['settings']['max_batch']})"
            expect = r["images_per_s"] * r["passes_per_image"] / ref["images_per_s"]
            assert r["ratio_to_bare"] == pytest.approx(expect, rel=1e-9)
            checked["bare"] += 1
        elif r["section"] == "job":
            assert ref["section"] == "loop" and ref["dtype"] == r["dtype"] and ref["model"] == r["model"]
            assert r["ratio_to_bare"] == pytest.approx(r["images_per_s"] / ref["images_per_s"], rel=1e-9)
            checked["bare"] += 1
        if r["captum_row"]:
            cap = by_id[r["captum_row"]]
            assert cap["section"] == "captum" and cap["method"] == r["method"] and cap["dtype"] == r["dtype"]
            assert cap["images_per_call"] == r["images_per_call"]  # same images per call
            if cap["images_per_s"]:
                assert r["ours_over_captum"] == pytest.approx(r["images_per_s"] / cap["images_per_s"], rel=1e-9)
                checked["captum"] += 1
        if r["dtype"] == "bfloat16":
            twin = by_id.get(r["id"].replace("/bfloat16/", "/float32/"))
            if twin and twin["images_per_s"]:
                assert r["bf16_over_f32"] == pytest.approx(r["images_per_s"] / twin["images_per_s"], rel=1e-9)
                checked["bf16"] += 1
        else:
            assert r["bf16_over_f32"] is None
    assert checked["bare"] >= 2 * 2 * 11 and checked["captum"] >= 2 * 2 * 4 - 2 and checked["bf16"] >= 2 * 14
    # the targets are the rows' ratios against issue 12's goals
    for t in data["targets"]:
        row = by_id[t["row"]]
        assert t["value"] in (row["ratio_to_bare"], row["ours_over_captum"], row["bf16_over_f32"])
        assert t["met"] == (None if t["value"] is None else t["value"] >= t["goal"])


@pytest.mark.ray
def test_smoke_jobs_wrote_every_image_to_their_stores(smoke):
    data, _ = smoke
    n, size = data["settings"]["job_images"], data["settings"]["image_size"]
    jobs = [r for r in data["rows"] if r["section"] == "job"]
    assert len(jobs) == 5 and {r["workers"] for r in jobs} == {0, 1}
    for r in jobs:
        assert not r["capped"] and r["images_committed"] == n == r["store_images_ok"], r["id"]
        assert r["config"]["run"]["autocast"] == ("bfloat16" if r["dtype"] == "bfloat16" else "none")
        assert r["config"]["spectra"]["enabled"] and list(r["config"]["methods"]) == ["saliency"]
        g = zarr.open_group(r["store"], mode="r")
        assert int(g["ok"][:].sum()) == n and g["units/done"][:].all()
        maps = g["maps/saliency"][:].astype(np.float32)
        assert maps.shape == (n, size, size) and np.isfinite(maps).all() and (maps.reshape(n, -1).max(1) > 0).all()
        hf = g["hf_fraction/saliency"][:]
        assert np.isfinite(hf).all() and ((hf >= 0) & (hf <= 1)).all()
        assert g.attrs["config"]["model"]["weights"].endswith(f"{r['model']}.pt")
