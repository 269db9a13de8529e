import yaml

from distributed_attr.cli import main


def test_run_and_inspect_from_the_command_line(tmp_path, parquet_dir, make_config, capsys):
    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "units done: 6/6" in out and "failed images: 0" in out
    assert main(["inspect", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "6/6 units, 96/96 images (complete)" in out
    assert "maps/integrated_gradients" in out
    # a second plain run refuses to touch finished work
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 2
    assert "Pass --resume" in capsys.readouterr().err


def test_a_wrong_config_fails_before_work_naming_the_key(tmp_path, parquet_dir, make_config, capsys):
    cfg = make_config(parquet_dir, tmp_path / "s.zarr")
    cfg["run"]["autocast"] = "fp8"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "run.autocast: 'fp8' is not one of ['none', 'bfloat16', 'float16']" in err
    assert not (tmp_path / "s.zarr").exists()


def test_aggregate_from_the_command_line_and_the_ray_job_entrypoint(tmp_path, capsys):
    """`distributed-attr aggregate` and `jobs/aggregate.py` pass --workers, --threads and
    --no-maps through: without maps the store's aggregates have spectra but no mean maps."""
    import importlib.util
    import json
    from pathlib import Path

    import zarr

    from distributed_attr.aggregate.synthetic import write_synthetic_store

    store = write_synthetic_store(tmp_path / "s.zarr", n_images=40, unit_size=8, height=12)
    assert main(["aggregate", str(store), "--workers", "0", "--threads", "1", "--no-maps", "--json",
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads_per_worker"] == 1 and result["workers"] == 0 and result["images"] > 0
    agg = zarr.open_group(str(store), mode="r")["aggregates/saliency"]
    assert "spectrum_mean" in agg and "map_mean" not in agg

    spec = importlib.util.spec_from_file_location(
        "aggregate_job", Path(__file__).resolve().parents[1] / "jobs" / "aggregate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([str(store), "--workers", "0", "--threads", "2", "--out", str(tmp_path / "out2")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads_per_worker"] == 2
    assert "map_mean" in zarr.open_group(str(store), mode="r")["aggregates/saliency"]
