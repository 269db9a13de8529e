"""``distributed-attr benchmark build``: write the dataset, train (or reuse) both models, copy
their weights and records next to the data, write an example job config."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from . import generate as gen
from . import train as tr

JOB_EXAMPLE = """\
# An attribution job over the benchmark's test split with the plain model (paths are relative to
# this file). For the anti-aliased model: weights models/benchmark_resnet_aa.pt, anti_aliased: true.
data:
  format: parquet
  path: data/test-*.parquet
  image_size: {size}
  channels: 3                 # mean/std: the defaults (ImageNet's), what the models were trained with
  mask_column: mask           # the ground-truth mask of the class-deciding object
store: out/benchmark-test.zarr
model:
  kind: callable
  name: distributed_attr.benchmark.models:BenchmarkResNet
  kwargs: {{in_channels: 3, num_classes: {num_classes}, width: {width}, anti_aliased: false}}
  weights: models/benchmark_resnet.pt
methods:
  saliency: {{}}
  integrated_gradients: {{steps: 32}}
  smoothgrad: {{samples: 16, noise_level: 0.15}}
  gradcam: {{}}
  rise: {{}}
"""


def build(out_dir: str | Path = "benchmark-data", size: int = gen.DEFAULT_SIZE, seed: int = 0,
          images: int = gen.DEFAULT_IMAGES, epochs: int = tr.EPOCHS, log: Callable[[str], None] = print) -> dict:
    """Write (or keep, when already built with these settings) the dataset under ``out_dir``,
    train or load both models, and return a summary: paths and accuracies."""
    gen.check_settings(size, images)
    root = Path(out_dir)
    if gen.is_built(root, seed, size, images):
        log(f"dataset: {root} (already built: seed {seed}, {size} px, {images} images)")
    else:
        log(f"dataset: writing {images} images at {size} px (seed {seed}) to {root} ...")
        t0 = time.perf_counter()
        gen.write_benchmark(root, seed=seed, size=size, images=images)
        log(f"dataset: written in {time.perf_counter() - t0:.0f} s")
    manifest = gen.read_manifest(root)
    for split, files in manifest["files"].items():
        log(f"  {split:10s} {manifest['counts'][split]:6d} images  {root / 'data'}/{split}-*.parquet ({len(files)} files)")
    data = None
    models_dir = root / "models"
    models_dir.mkdir(exist_ok=True)
    summary = {"dataset": str(root), "manifest": str(root / "benchmark.json"), "models": {}}
    for name in tr.MODELS:
        weights, record_path = tr.cache_paths(name, size, seed, images, epochs)
        if not (weights.exists() and record_path.exists()) and data is None:
            log("models: reading the dataset ...")
            data = tr.dataset(seed, size, images, data_dir=root)
        if not weights.exists():
            log(f"{name}: training ({epochs} epochs on {manifest['counts']['train']} images, one thread) ...")
        _model, weights, record = tr.pretrained(name, size=size, seed=seed, images=images, epochs=epochs,
                                               data=data, log=log)
        shutil.copyfile(weights, models_dir / f"{name}.pt")
        (models_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"{name}: test accuracy {record['test_accuracy']:.4f} ({record['counts']['test']} images), "
            f"validation {record['validation_accuracy']:.4f}; trained in {record['train_seconds']:.0f} s; "
            f"weights {models_dir / (name + '.pt')} (cached: {weights})")
        summary["models"][name] = {"weights": str(models_dir / f"{name}.pt"), "cache": str(weights),
                                   "test_accuracy": record["test_accuracy"],
                                   "validation_accuracy": record["validation_accuracy"]}
    job = root / "job-example.yaml"
    job.write_text(JOB_EXAMPLE.format(size=size, num_classes=len(gen.CLASSES), width=tr.WIDTH))
    log(f"example job config: {job}")
    summary["job_example"] = str(job)
    return summary
