"""GPU benchmark for issue 12 ("Keep the GPUs fed"): one command, one table, under 8 minutes.

    python bench/gpu.py [--json PATH] [--workdir DIR] [--models resnet50,vit_b_16] [--fast-paths JSON]
    python bench/gpu.py --smoke [--json PATH]      # the same code on the CPU with tiny models, in seconds

For each model (torchvision ResNet-50 and ViT-B/16, random weights, 224 px) in float32 and bfloat16
(autocast: our ``run.autocast: bfloat16`` path), on one device:

1. bare: the model's forward+backward to the input (batch ``batch`` and ``max_batch``) and its
   forward alone (batch ``max_batch``), the limits the methods are measured against;
2. ours: saliency, gradcam, integrated_gradients (32 steps), smoothgrad (16 samples), occlusion
   (16 px windows, stride 8), rise, through ``methods.compute_maps`` as the job calls it;
   "of bare" = images/s x passes per image / the bare rate that applies (forward+backward at
   ``batch`` for one-pass methods, at ``max_batch`` for multi-pass ones, forward alone for
   occlusion and RISE): 1.0 = as fast as the model allows;
3. Captum on the same device, model, images and batch budget for the methods it has; "ours/Captum";
4. the whole job (``runner.run`` with a config dict): a Parquet dataset of JPEG photographs ->
   decode -> actors -> Zarr store, saliency with spectra, one actor with one GPU and four actors
   with ``gpus_per_worker: 0.25`` (the machine's cores shared among the actors as
   ``cpus_per_worker``), against the bare in-memory loop (the same model computing saliency,
   targets from the same forward pass, on images decoded beforehand and already on the device);
   a job stops after ``job_cap_s`` (its rate: the images of its committed units over that time);
5. the peak device memory of every row (``torch.cuda.max_memory_allocated``, reset per row; for
   job rows, whose actors are other processes, the whole device's use sampled every 0.1 s).

Timing: a warm-up call, then calls until ``budget_s`` seconds have passed (at least ``min_reps``),
each timed with CUDA events after a synchronize (``perf_counter`` on the CPU); images/s from the
median call. A failing row (an out-of-memory error, a missing API) prints its error in the table.
Rows that would start after ``deadline_s`` are skipped, so a run stays under 8 minutes.
``--smoke`` runs the same functions with the tiny models of ``SMOKE`` on the CPU; only the fields of
``Mode`` differ (models, size, batch, budget; RISE's mask count, which only sets how many forward
passes an image costs; job layouts without GPUs: in the driver process for every model and dtype,
one CPU actor for the first model in bfloat16 only, since each actor start costs seconds there).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the private local Ray of the jobs (docs/ray.md)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from distributed_attr.config import DataConfig, ModelConfig  # noqa: E402
from distributed_attr.io.models import load_model  # noqa: E402
from distributed_attr.io.sources import decode_image  # noqa: E402
from distributed_attr.methods import Context, build_method, compute_maps, resolve_layer  # noqa: E402

# ------------------------------------------------------------------------------------------------
# FAST PATHS: merged (recursively) into every job config. Empty: the job rows measure the config's
# defaults. Switch fast paths on here (run.channels_last, run.compile, run.decode_on_gpu,
# run.decode_workers, run.prefetch_units), e.g.
#     {"run": {"channels_last": True, "compile": True, "decode_workers": 8, "prefetch_units": 2}}
# ``--fast-paths '<json>'`` merges more on top for one run. A key the config does not know fails
# the job rows (the error is printed in the table), not the run.
FAST_PATHS: dict[str, Any] = {}
# ------------------------------------------------------------------------------------------------

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: scikit-image sample photographs bundled with the package (no download)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
JPEG_SIZE = (500, 375)  # width, height (landscape; a quarter of the images are portrait)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
#: targets of issue 12
TARGET_OF_BARE = 0.9  # gradient family, of the bare forward+backward rate
TARGET_VS_CAPTUM = 1.5  # integrated_gradients and smoothgrad, ours / Captum
TARGET_JOB = 0.8  # whole job / bare in-memory saliency loop
TARGET_BF16 = 1.5  # bfloat16 / float32


@dataclass(frozen=True)
class ModelSpec:
    label: str
    kind: str  #: ModelConfig.kind, so that the job loads exactly this model
    name: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Mode:
    name: str
    models: tuple[ModelSpec, ...]
    image_size: int
    batch: int  #: bare forward+backward, one-pass methods, the job's run.batch_size
    max_batch: int  #: samples per internal pass: our run.max_batch, Captum's internal batch sizes
    samples_per_call: int  #: a multi-pass row explains ceil(samples_per_call / passes) images per call
    budget_s: float  #: timed seconds per row, after the warm-up
    min_reps: int
    rise_masks: int
    job_images: int
    unit_size: int
    job_layouts: tuple[tuple[str, int, float], ...]  #: (label, run.num_workers, run.gpus_per_worker)
    #: "all": every layout for every model and dtype; "first": layouts with actors only for the first
    #: model in bfloat16 (one Ray start, one actor start: enough to check that path on a CPU)
    actor_jobs: str
    job_cap_s: float  #: a job is stopped after this long (rate = committed images / time)
    deadline_s: float  #: rows that would start later are skipped
    threads: int | None  #: torch threads in this process (None: torch's default)


FULL = Mode(
    name="full",
    models=(ModelSpec("resnet50", "torchvision", "resnet50"), ModelSpec("vit_b_16", "torchvision", "vit_b_16")),
    image_size=224, batch=64, max_batch=256, samples_per_call=512, budget_s=1.5, min_reps=2, rise_masks=1000,
    job_images=4096, unit_size=128,
    job_layouts=(("1 actor x 1 GPU", 1, 1.0), ("4 actors x 0.25 GPU", 4, 0.25)),
    actor_jobs="all", job_cap_s=20.0, deadline_s=420.0, threads=None,
)
SMOKE = Mode(
    name="smoke",
    models=(
        ModelSpec("tiny_resnet", "callable", "distributed_attr.zoo:DigitsResNet",
                  {"in_channels": 3, "num_classes": 10, "width": 4}),
        ModelSpec("tiny_vit", "callable", "torchvision.models:VisionTransformer",
                  {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32,
                   "mlp_dim": 64, "num_classes": 10}),
    ),
    image_size=32, batch=8, max_batch=32, samples_per_call=32, budget_s=0.02, min_reps=2, rise_masks=16,
    job_images=24, unit_size=8,
    job_layouts=(("in-process (num_workers 0)", 0, 0.0), ("1 CPU actor", 1, 0.0)),
    actor_jobs="first", job_cap_s=120.0, deadline_s=600.0, threads=1,
)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: dict
    captum: str | None  #: which Captum attribution to compare with


def method_specs(mode: Mode) -> list[MethodSpec]:
    return [
        MethodSpec("saliency", {}, "saliency"),
        MethodSpec("gradcam", {}, "gradcam"),
        MethodSpec("integrated_gradients", {"steps": 32}, "integrated_gradients"),
        MethodSpec("smoothgrad", {"samples": 16, "noise_level": 0.15}, "smoothgrad"),
        MethodSpec("occlusion", {"patch": 16, "stride": 8}, "occlusion"),
        MethodSpec("rise", {"masks": mode.rise_masks}, None),
    ]


def describe(spec: MethodSpec) -> str:
    p = spec.params
    extra = {"integrated_gradients": f" ({p.get('steps')} steps)", "smoothgrad": f" ({p.get('samples')} samples)",
             "occlusion": f" ({p.get('patch')} px, stride {p.get('stride')})",
             "rise": f" ({p.get('masks')} masks)"}.get(spec.name, "")
    return spec.name + extra


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class Clock:
    """Times one call: CUDA events around it (after a synchronize) on a GPU, perf_counter on the
    CPU. The end event is recorded after the call returns, so host work inside the call counts."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def measure(fn: Callable[[], object], clock: Clock, budget_s: float, min_reps: int) -> tuple[list[float], float]:
    """(timed call seconds, warm-up seconds). One warm-up call (two when calls are short), then calls
    until ``budget_s`` has passed and at least ``min_reps`` ran (one, when a call takes longer than
    both the budget and a second)."""
    warm = clock.time(fn)
    if warm < budget_s / 4:
        warm = clock.time(fn)
    need = min_reps if warm <= max(budget_s, 1.0) else 1
    reps: list[float] = []
    t0 = time.perf_counter()
    while len(reps) < need or (time.perf_counter() - t0 < budget_s and len(reps) < 1000):
        reps.append(clock.time(fn))
    return reps, warm


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------


def natural_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG photographs (quality 90, 500x375 or 375x500): random crops, rescales and flips of
    scikit-image's bundled sample photos; deterministic."""
    from PIL import Image
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]

    def one(i: int) -> bytes:
        rng = np.random.default_rng([seed, i])
        photo = photos[i % len(photos)]
        w, h = photo.size
        out_w, out_h = JPEG_SIZE if rng.random() < 0.75 else JPEG_SIZE[::-1]
        aspect = out_w / out_h
        crop_w = min(w, h * aspect) * rng.uniform(0.55, 1.0)
        crop_h = crop_w / aspect
        x0, y0 = rng.uniform(0, w - crop_w), rng.uniform(0, h - crop_h)
        im = photo.resize((out_w, out_h), Image.BILINEAR, box=(x0, y0, x0 + crop_w, y0 + crop_h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:  # PIL releases the GIL
        return list(ex.map(one, range(n)))


def write_parquet(out_dir: Path, jpegs: list[bytes], shards: int = 4, row_group_size: int = 64) -> Path:
    """Hugging Face ``datasets`` layout: ``image`` struct {bytes, path}, ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    for s, idx in enumerate(np.array_split(np.arange(len(jpegs)), shards)):
        table = pa.table({
            "image": [{"bytes": jpegs[i], "path": f"{i:06d}.jpg"} for i in idx],
            "label": pa.array((idx % 10).astype(np.int64)),
        })
        pq.write_table(table, out_dir / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=row_group_size)
    return out_dir


def data_config(mode: Mode) -> DataConfig:
    return DataConfig(path="-", image_size=mode.image_size, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def model_config(spec: ModelSpec, weights: str | None = None) -> ModelConfig:
    return ModelConfig(kind=spec.kind, name=spec.name, kwargs=dict(spec.kwargs), weights=weights)


def build_model(spec: ModelSpec, weights_dir: Path) -> tuple[nn.Module, Path]:
    """The model as the job loads it (``io.models.load_model``: eval, parameters frozen), seeded;
    a classifier that torchvision starts at zero (ViT's head: all-zero gradients) is re-drawn.
    Saved, so that the job's actors load these very weights."""
    torch.manual_seed(0)
    model = load_model(model_config(spec))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
    path = weights_dir / f"{spec.label}.pt"
    torch.save(model.state_dict(), path)
    return model, path


@dataclass
class CamLayer:
    """The layer ``resolve_layer`` picks for Grad-CAM (None when there is none to use) and what
    Captum can do with it."""

    layer: nn.Module | None
    note: str  #: "layer <name> (<output shape>)", or why there is no row
    captum_note: str | None = None  #: why Captum's LayerGradCam cannot run on it (None: it can)


def cam_layer(model: nn.Module, x: torch.Tensor) -> CamLayer:
    """No layer when ``resolve_layer`` picks one fed the image itself (before issue 13 it chose a
    ViT's patch embedding): that is no CAM layer. Captum's LayerGradCam treats dimension 1 of the
    layer output as channels and the rest as space, so it runs on (N, K, h, w) outputs only; our
    Grad-CAM also maps token sequences to grids (issue 13)."""
    try:
        layer = resolve_layer(model, None, x[:1])
    except ValueError as exc:
        return CamLayer(None, f"n/a: {exc}")
    name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
    probe = x[:1]
    seen: list[tuple[bool, tuple[int, ...]]] = []

    def hook(_m, inputs, output):
        seen.append((bool(inputs) and inputs[0] is probe, tuple(output.shape) if isinstance(output, torch.Tensor) else ()))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
    fed_image, shape = seen[-1] if seen else (False, ())
    if fed_image:
        note = f"n/a (issue 13): resolve_layer picks {name}, which is fed the image itself"
        return CamLayer(None, note, note)
    captum_note = None if len(shape) == 4 else (
        f"n/a: Captum's LayerGradCam needs (N, K, h, w); layer {name} outputs {shape[1:]} per image")
    return CamLayer(layer, f"layer {name} {shape[1:]}", captum_note)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batch_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` images: the pool repeated as needed."""
    reps = math.ceil(n / x.shape[0])
    return (x.repeat(reps, 1, 1, 1) if reps > 1 else x)[:n].contiguous()


# ------------------------------------------------------------------------------------------------
# Row functions: each returns (callable doing one call, images per call)
# ------------------------------------------------------------------------------------------------


def bare_fwd_bwd(model, x, target, dtype):
    def call():
        xi = x.detach().requires_grad_(True)
        with autocast(x.device, dtype):
            out = model(xi)
        torch.autograd.grad(out.gather(1, target[:, None]).float().sum(), xi)
    return call


def bare_fwd(model, x, dtype):
    def call():
        with torch.no_grad(), autocast(x.device, dtype):
            model(x)
    return call


def bare_saliency_loop(model, pool: list[torch.Tensor], dtype):
    """What a user writes: forward, target = the prediction of that same forward, gradient of the
    target logit to the input, max |gradient| over channels. One call = the next batch of the pool."""
    state = {"i": 0}

    def call():
        x = pool[state["i"] % len(pool)]
        state["i"] += 1
        xi = x.detach().requires_grad_(True)
        with autocast(x.device, dtype):
            out = model(xi)
        target = out.detach().argmax(1)
        (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).float().sum(), xi)
        return grad.abs().amax(1)
    return call


def ours(model, x, target, spec: MethodSpec, layer, mode: Mode, dtype):
    method = build_method(spec.name, spec.params)
    ctx = Context(seed=0, budget=mode.max_batch, autocast=dtype, layer=layer,
                  indices=torch.arange(x.shape[0]))
    return lambda: compute_maps(model, x, target, [method], ctx)


def captum(model, x, target, spec: MethodSpec, layer, mode: Mode, dtype):
    """Captum's attribution for ``spec`` with the same parameters and samples per forward pass,
    reduced over channels as ours is; under autocast for bfloat16 (Captum has no AMP of its own)."""
    from captum.attr import (IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion,
                             Saliency)

    n = x.shape[0]
    per_eval = max(1, mode.max_batch // n)  # perturbations / noise samples per forward: max_batch samples
    p = spec.params
    if spec.captum == "saliency":
        fn = lambda: Saliency(model).attribute(x, target=target, abs=True).amax(1)  # noqa: E731
    elif spec.captum == "gradcam":
        size = tuple(x.shape[-2:])
        fn = lambda: LayerAttribution.interpolate(  # noqa: E731
            LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True), size, "bilinear")
    elif spec.captum == "integrated_gradients":
        fn = lambda: IntegratedGradients(model).attribute(  # noqa: E731
            x, target=target, n_steps=p["steps"], method="gausslegendre", internal_batch_size=mode.max_batch).sum(1)
    elif spec.captum == "smoothgrad":
        flat = x.reshape(n, -1)
        sigma = float((p["noise_level"] * (flat.amax(1) - flat.amin(1))).mean())  # Captum: one sigma for all
        fn = lambda: NoiseTunnel(Saliency(model)).attribute(  # noqa: E731
            x, nt_type="smoothgrad", nt_samples=p["samples"], nt_samples_batch_size=per_eval, stdevs=sigma,
            target=target, abs=False).sum(1)
    elif spec.captum == "occlusion":
        fn = lambda: Occlusion(model).attribute(  # noqa: E731
            x, sliding_window_shapes=(x.shape[1], p["patch"], p["patch"]), strides=(1, p["stride"], p["stride"]),
            baselines=0.0, target=target, perturbations_per_eval=per_eval)
    else:
        raise ValueError(f"no Captum reference for {spec.name}")

    def call():
        with autocast(x.device, dtype):
            return fn()
    return call


def captum_setting(spec: MethodSpec, mode: Mode, n: int) -> str:
    per_eval = max(1, mode.max_batch // n)
    return {
        "saliency": "Saliency(abs=True), max over channels",
        "gradcam": "LayerGradCam(relu) + LayerAttribution.interpolate bilinear",
        "integrated_gradients": f"IntegratedGradients gausslegendre, internal_batch_size={mode.max_batch}",
        "smoothgrad": f"NoiseTunnel(Saliency) smoothgrad, nt_samples_batch_size={per_eval}",
        "occlusion": f"Occlusion, perturbations_per_eval={per_eval}",
    }.get(spec.captum or "", "")


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, mode: Mode, device: torch.device, workdir: Path, fast_paths: dict[str, Any]):
        self.mode, self.device, self.workdir, self.fast_paths = mode, device, workdir, fast_paths
        self.clock = Clock(device)
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    # -- rows --------------------------------------------------------------------------------------
    def past_deadline(self) -> bool:
        return time.perf_counter() - self.t0 > self.mode.deadline_s

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None

    def row(self, section: str, model: str, dtype: str, name: str, **extra: Any) -> dict[str, Any]:
        r = {"id": f"{model}/{dtype}/{name}", "section": section, "model": model, "dtype": dtype, "name": name,
             "images_per_s": None, "passes_per_image": None, "images_per_call": None, "reps": 0,
             "call_seconds": [], "warmup_seconds": None, "ratio_to_bare": None, "bare_row": None,
             "ours_over_captum": None, "captum_row": None, "bf16_over_f32": None, "peak_mem_mib": None,
             "error": None, "na": False, "notes": ""}
        r.update(extra)
        self.rows.append(r)
        return r

    def timed(self, r: dict[str, Any], make: Callable[[], Callable[[], object]], images_per_call: int,
              passes: float) -> dict[str, Any]:
        r.update(images_per_call=images_per_call, passes_per_image=passes)
        if self.past_deadline():
            r["error"] = f"skipped: past the {self.mode.deadline_s:.0f} s time budget"
            return r
        self._reset_peak()
        try:
            fn = make()
            reps, warm = measure(fn, self.clock, self.mode.budget_s, self.mode.min_reps)
            med = statistics.median(reps)
            r.update(images_per_s=images_per_call / med, reps=len(reps), warmup_seconds=warm,
                     call_seconds=[round(t, 6) for t in reps])
        except Exception as exc:  # an out-of-memory error, an API Captum lacks: the row says so
            r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        finally:
            r["peak_mem_mib"] = self._peak()
        if r["error"] and self.device.type == "cuda":  # the traceback (and its tensors) is gone now
            gc.collect()
            torch.cuda.empty_cache()
        self.progress(r)
        return r

    def progress(self, r: dict[str, Any]) -> None:
        print(f"  [{time.perf_counter() - self.t0:6.1f} s] {r['id']}: "
              + (f"{r['images_per_s']:.2f} images/s" if r["images_per_s"] else r["error"]), file=sys.stderr, flush=True)

    # -- per model ---------------------------------------------------------------------------------
    def model_rows(self, spec: ModelSpec, model: nn.Module, pool: torch.Tensor) -> None:
        """Bare, ours and Captum rows of one model in every dtype, then the job's bare loop."""
        mode, dev = self.mode, self.device
        model = model.to(dev)
        x = pool.to(dev)
        with torch.no_grad():
            target_all = model(batch_of(x, mode.max_batch)).argmax(1)
        cam = cam_layer(model, x)
        layer = cam.layer
        x_b, t_b = x[:mode.batch], target_all[:mode.batch]
        x_m, t_m = batch_of(x, mode.max_batch), target_all
        for dname, dtype in DTYPES.items():
            fb = self.timed(self.row("bare", spec.label, dname, f"bare fwd+bwd (batch {mode.batch})"),
                            partial(bare_fwd_bwd, model, x_b, t_b, dtype), mode.batch, 1)
            fbm = self.timed(self.row("bare", spec.label, dname, f"bare fwd+bwd (batch {mode.max_batch})"),
                             partial(bare_fwd_bwd, model, x_m, t_m, dtype), mode.max_batch, 1)
            fw = self.timed(self.row("bare", spec.label, dname, f"bare fwd (batch {mode.max_batch})"),
                            partial(bare_fwd, model, x_m, dtype), mode.max_batch, 1)
            for ms in method_specs(mode):
                method = build_method(ms.name, ms.params)
                passes = method.cost(mode.image_size, mode.image_size) if ms.name == "occlusion" else method.cost()
                n = mode.batch if passes <= 1 else max(1, min(mode.batch, math.ceil(mode.samples_per_call / passes)))
                xs, ts = batch_of(x, n), target_all[:n]  # n <= max_batch: the same repeated pool
                ref = fw if method.family == "prediction" else (fb if passes <= 1 else fbm)
                label = describe(ms)
                o = self.row("ours", spec.label, dname, f"ours {label}", method=ms.name, params=ms.params,
                             bare_row=ref["id"], notes=cam.note if method.needs_layer and layer is not None else "")
                c = None
                if ms.captum:
                    c = self.row("captum", spec.label, dname, f"Captum {label}", method=ms.name,
                                 bare_row=ref["id"], notes=captum_setting(ms, mode, n))
                    o["captum_row"] = c["id"]
                for r, why in ((o, cam.note), (c, cam.captum_note)):
                    if r is not None and method.needs_layer and (layer is None or why and r is c):
                        r.update(error=why, na=True, passes_per_image=passes, images_per_call=n)
                if not o["na"]:
                    self.timed(o, partial(ours, model, xs, ts, ms, layer, mode, dtype), n, passes)
                if c is not None and not c["na"]:
                    self.timed(c, partial(captum, model, xs, ts, ms, layer, mode, dtype), n, passes)
        model.cpu()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def loop_rows(self, spec: ModelSpec, model: nn.Module, pool: torch.Tensor) -> None:
        mode, dev = self.mode, self.device
        model = model.to(dev)
        batches = [t.to(dev) for t in batch_of(pool, max(len(pool), mode.batch)).split(mode.batch) if len(t) == mode.batch]
        for dname, dtype in DTYPES.items():
            self.timed(self.row("loop", spec.label, dname, f"bare saliency loop (batch {mode.batch}, in memory)",
                                notes="targets from the same forward; images decoded beforehand, on the device"),
                       partial(bare_saliency_loop, model, batches, dtype), mode.batch, 1)
        model.cpu()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # -- the whole job -----------------------------------------------------------------------------
    def job_row(self, spec: ModelSpec, weights: Path, data_dir: Path, dname: str, layout: tuple[str, int, float]) -> None:
        from distributed_attr.io.store import AttributionStore, open_group
        from distributed_attr.runner import run

        mode = self.mode
        label, workers, gpus = layout
        cpus = actor_cpus(workers)
        loop_id = f"{spec.label}/{dname}/bare saliency loop (batch {mode.batch}, in memory)"
        r = self.row("job", spec.label, dname, f"job, {label}", workers=workers, gpus_per_worker=gpus,
                     cpus_per_worker=cpus if workers else None,
                     notes=f"{cpus} CPU(s) per actor" if workers else "in the driver process",
                     bare_row=loop_id, passes_per_image=1, images_total=mode.job_images, store=None,
                     store_images_ok=None, images_committed=None, capped=False, startup_seconds=None)
        if self.past_deadline():
            r["error"] = f"skipped: past the {mode.deadline_s:.0f} s time budget"
            return
        slug = f"{spec.label}-{dname}-{workers}x{gpus:g}".replace(" ", "")
        store = self.workdir / "stores" / f"{slug}.zarr"
        cfg = {
            "data": {"format": "parquet", "path": str(data_dir), "image_size": mode.image_size, "channels": 3,
                     "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            "store": str(store),
            "model": {"kind": spec.kind, "name": spec.name, "kwargs": dict(spec.kwargs), "weights": str(weights)},
            "methods": {"saliency": {}},
            "spectra": {"enabled": True},
            "run": {"num_workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": cpus, "batch_size": mode.batch,
                    "max_batch": mode.max_batch, "unit_size": mode.unit_size,
                    "autocast": "bfloat16" if dname == "bfloat16" else "none", "seed": 0},
        }
        cfg = deep_merge(cfg, self.fast_paths)
        r["config"] = cfg
        t_start = [0.0]

        def cap(_unit: int) -> None:  # the job's time budget: stop it like Ctrl-C (committed units stay)
            if not t_start[0]:
                t_start[0] = time.perf_counter()
            elif time.perf_counter() - t_start[0] > mode.job_cap_s:
                r["capped"] = True
                raise KeyboardInterrupt

        sampler = DeviceMemorySampler() if self.device.type == "cuda" else None
        try:
            if sampler:
                sampler.start()
            summary = run(cfg, overwrite=True, progress=False, _after_commit=cap)
            if summary.failures:
                raise RuntimeError(f"{len(summary.failures)} image(s) failed, e.g. {next(iter(summary.failures.values()))}")
            st = AttributionStore.open(str(store), mode="r")
            done = st.done_units()
            committed = int(sum(st.unit_range(int(u))[1] - st.unit_range(int(u))[0] for u in done))
            if not len(done):
                raise RuntimeError("the job committed no unit")
            g = open_group(str(store))
            ok = g["ok"][:]
            maps = g["maps/saliency"]
            lo, hi = st.unit_range(int(done[0]))
            first, hf = maps[lo:hi].astype(np.float32), g["hf_fraction/saliency"][lo:hi]
            if not np.isfinite(first).all() or not np.abs(first).max() > 0 or not np.isfinite(hf).all():
                raise RuntimeError(f"unit {int(done[0])}: stored saliency maps or spectra not finite, or maps all zero")
            r.update(images_per_s=summary.images_per_second, store=str(store), store_images_ok=int(ok.sum()),
                     images_committed=committed, reps=1, call_seconds=[round(summary.seconds, 3)],
                     images_per_call=committed, startup_seconds=(st.attrs.get("last_run") or {}).get("startup_seconds"),
                     store_shape=list(maps.shape))
            if r["capped"]:
                r["notes"] += f"; stopped after {mode.job_cap_s:.0f} s: {committed} of {mode.job_images} images"
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        finally:
            if sampler:
                r["peak_mem_mib"] = sampler.stop()
                r["notes"] = (r["notes"] + "; " if r["notes"] else "") + "peak: whole device, all processes, sampled"
        self.progress(r)

    # -- ratios ------------------------------------------------------------------------------------
    def ratios(self) -> None:
        """Every ratio from the numbers in the rows (recomputable from the JSON)."""
        by_id = {r["id"]: r for r in self.rows}
        for r in self.rows:
            ips = r["images_per_s"]
            if not ips:
                continue
            ref = by_id.get(r["bare_row"] or "")
            if ref and ref["images_per_s"]:
                r["ratio_to_bare"] = ips * (r["passes_per_image"] or 1) / ref["images_per_s"] if r["section"] != "job" \
                    else ips / ref["images_per_s"]
            cap = by_id.get(r["captum_row"] or "")
            if cap and cap["images_per_s"]:
                r["ours_over_captum"] = ips / cap["images_per_s"]
            if r["dtype"] == "bfloat16":
                twin = by_id.get(r["id"].replace("/bfloat16/", "/float32/", 1))
                if twin and twin["images_per_s"]:
                    r["bf16_over_f32"] = ips / twin["images_per_s"]

    def targets(self) -> list[dict[str, Any]]:
        out = []

        def add(what: str, row: dict[str, Any], key: str, goal: float) -> None:
            v = row[key]
            out.append({"target": what, "row": row["id"], "value": v, "goal": goal,
                        "met": None if v is None else bool(v >= goal)})

        for r in self.rows:
            if r["section"] == "ours" and r.get("method") in ("saliency", "gradcam", "integrated_gradients", "smoothgrad") \
                    and not r["na"]:
                add(f"gradient family >= {TARGET_OF_BARE} x bare fwd+bwd", r, "ratio_to_bare", TARGET_OF_BARE)
            if r["section"] == "ours" and r.get("method") in ("integrated_gradients", "smoothgrad"):
                add(f"ours >= {TARGET_VS_CAPTUM} x Captum", r, "ours_over_captum", TARGET_VS_CAPTUM)
            if r["section"] == "job":
                add(f"job >= {TARGET_JOB} x bare in-memory loop", r, "ratio_to_bare", TARGET_JOB)
            if r["dtype"] == "bfloat16" and r["section"] in ("ours", "job") and not r["na"]:
                add(f"bfloat16 >= {TARGET_BF16} x float32", r, "bf16_over_f32", TARGET_BF16)
        return out


class DeviceMemorySampler:
    """Peak memory in use on GPU 0 by every process (the job's actors are other processes), sampled
    every 0.1 s with cudaMemGetInfo, minus what was in use before."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        self.base = total - free
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free - self.base)
            self._stop.wait(self.every)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def actor_cpus(workers: int) -> int:
    """CPUs per actor (``run.cpus_per_worker``: its torch threads and, by default, its decode
    threads): the machine's cores shared among the actors, one left for the driver."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, workers))


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | dtype | row | images/s | passes/image | of bare | ours/Captum | bf16/f32 | peak MiB | notes |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        notes = r["error"] if r["error"] else r["notes"]
        passes = r["passes_per_image"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['name']} | {fmt(r['images_per_s'])} | "
            f"{'-' if passes is None else f'{passes:g}'} | {fmt(r['ratio_to_bare'])} | {fmt(r['ours_over_captum'])} | "
            f"{fmt(r['bf16_over_f32'])} | {fmt(r['peak_mem_mib'], 0)} | {(notes or '').replace('|', '/')} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    try:
        import captum
        captum_version = captum.__version__
    except Exception:  # noqa: BLE001
        captum_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "captum": captum_version, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "device": "cpu", "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), device_memory_gib=round(props.total_memory / 2**30, 1),
                   device_count=torch.cuda.device_count())
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, in seconds (checks the code paths)")
    ap.add_argument("--json", type=Path, help="write every row, the environment and the targets here")
    ap.add_argument("--workdir", type=Path, help="keep the dataset, weights and stores here (default: a temporary folder)")
    ap.add_argument("--models", help="comma-separated subset of the mode's models")
    ap.add_argument("--fast-paths", default="{}", help="JSON merged over FAST_PATHS into every job config")
    ap.add_argument("--no-job", action="store_true", help="skip the whole-job rows (no Ray)")
    args = ap.parse_args(argv)
    t_wall = time.perf_counter()

    mode = SMOKE if args.smoke else FULL
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {m.label for m in mode.models})
        if unknown:
            ap.error(f"unknown model(s) {unknown}; this mode has {[m.label for m in mode.models]}")
        mode = dataclasses.replace(mode, models=tuple(m for m in mode.models if m.label in wanted))
    if mode.threads:
        torch.set_num_threads(mode.threads)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        print("warning: no CUDA device; the full benchmark runs on the CPU (slow; numbers are not GPU results)",
              file=sys.stderr)
    fast = deep_merge(FAST_PATHS, json.loads(args.fast_paths))
    env = environment(device)

    tmp = None
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-gpu-")
        workdir = Path(tmp.name)
    bench = Bench(mode, device, workdir, fast)
    try:
        print(f"[setup] {mode.job_images} JPEGs -> Parquet; models", file=sys.stderr, flush=True)
        jpegs = natural_jpegs(max(mode.job_images, mode.batch))
        data_dir = write_parquet(workdir / "data", jpegs[:mode.job_images])
        dcfg = data_config(mode)
        pool = torch.stack([decode_image(j, dcfg) for j in jpegs[:mode.batch]])  # micro rows: real photos
        loop_pool = torch.stack([decode_image(j, dcfg) for j in jpegs[:4 * mode.batch]])
        (workdir / "weights").mkdir(exist_ok=True)
        built = []
        for spec in mode.models:
            model, weights = build_model(spec, workdir / "weights")
            built.append((spec, model, weights))
            print(f"[{spec.label}] bare, ours, Captum", file=sys.stderr, flush=True)
            bench.model_rows(spec, model, pool)
            bench.loop_rows(spec, model, loop_pool)
        del pool, loop_pool
        if not args.no_job:
            for spec, model, _ in built:
                model.cpu()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            jobs = [(spec, w, d, layout) for d in ("bfloat16", "float32") for spec, _, w in built
                    for layout in mode.job_layouts
                    if mode.actor_jobs == "all" or layout[1] == 0 or (spec is built[0][0] and d == "bfloat16")]
            print("[jobs] Parquet -> actors -> Zarr, saliency + spectra", file=sys.stderr, flush=True)
            if any(layout[1] > 0 for layout in mode.job_layouts):
                from distributed_attr.ray_session import ray_session

                with ray_session(None, num_cpus=os.cpu_count() or 1):  # one private local Ray for every job
                    for spec, w, d, layout in jobs:
                        bench.job_row(spec, w, data_dir, d, layout)
            else:
                for spec, w, d, layout in jobs:
                    bench.job_row(spec, w, data_dir, d, layout)
    finally:
        bench.ratios()
        wall = time.perf_counter() - t_wall
        targets = bench.targets()
        order = {"bare": 0, "ours": 1, "captum": 1, "loop": 2, "job": 3}
        index = {m.label: i for i, m in enumerate(mode.models)}
        rows = sorted(bench.rows, key=lambda r: (index.get(r["model"], 0), r["dtype"] != "float32", order[r["section"]]))
        smoke = " (SMOKE RUN on the CPU: checks the code paths; the numbers are not results)" if args.smoke else ""
        print(f"# bench/gpu.py, {mode.name} mode{smoke}")
        print(f"device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
              f"torchvision {env['torchvision']}, captum {env['captum']}; {env['cpu_cores']} CPU cores; {env['date']}")
        print(f"settings: {mode.image_size} px, batch {mode.batch}, max_batch {mode.max_batch}, "
              f"{mode.samples_per_call} samples per multi-pass call, {mode.budget_s:g} s per row (min {mode.min_reps} "
              f"calls, median), job {mode.job_images} JPEG images in units of {mode.unit_size}, spectra on; "
              f"fast paths: {json.dumps(fast) if fast else 'none'}\n")
        print(table(rows))
        print("\nof bare = images/s x passes/image / the bare row's images/s (fwd+bwd at batch "
              f"{mode.batch} for one-pass methods, at {mode.max_batch} for multi-pass ones, fwd alone for occlusion "
              "and RISE); job rows = job images/s / bare in-memory saliency loop.")
        print("targets of issue 12" + (" (smoke run: meaningless here)" if args.smoke else "") + ":")
        for what in dict.fromkeys(t["target"] for t in targets):
            group = [t for t in targets if t["target"] == what]
            measured = [t for t in group if t["value"] is not None]
            low = min(measured, key=lambda t: t["value"]) if measured else None
            print(f"  {what}: {sum(1 for t in group if t['met'])} of {len(group)} rows met"
                  + (f"; lowest {fmt(low['value'])} ({low['row']})" if low else ""))
        print(f"total wall time: {wall:.1f} s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "mode": mode.name, "smoke": bool(args.smoke), "environment": env, "settings": asdict(mode),
                "fast_paths": fast, "workdir": str(workdir) if args.workdir else None,
                "total_wall_seconds": wall, "rows": rows, "targets": targets,
            }, indent=1, default=str))
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
