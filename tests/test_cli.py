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
