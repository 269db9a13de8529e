"""The cluster recipes -- cluster.yaml (Ray cluster launcher, AWS), k8s/rayjob.yaml (KubeRay),
slurm/attribute.sbatch and docs/cluster.md -- checked without a cloud account, Kubernetes or Slurm
and without starting Ray: Ray's own schema for the launcher config, the fields KubeRay needs, the
version pins against pyproject.toml, the Slurm script run with srun/scontrol/ray/python stubbed,
and every entrypoint's arguments through the project's real argument parser (jobs/*.py run as
scripts, with the command they call replaced by ``cli.build_parser().parse_args``). What needs a
real cluster is listed in docs/cluster.md."""
from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distributed_attr import cli

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
SBATCH = ROOT / "slurm" / "attribute.sbatch"
DOC = ROOT / "docs" / "cluster.md"

#: values for the shell variables in the Slurm script's driver line
SHELL_VALUES = {"CONFIG": "job.yaml", "head_ip": "10.0.0.5", "PORT": "6379"}
#: words that must not appear as keys of anything that is logged or shown (runtime envs, storage_options)
SECRET_WORDS = ("secret", "password", "token", "access_key", "session", "credential", "sas")


# -- helpers ------------------------------------------------------------------------------------

def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def rayjob_documents() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ConfigMap", "RayJob"}, f"expected a ConfigMap and a RayJob, found {sorted(by_kind)}"
    return by_kind["ConfigMap"], by_kind["RayJob"]


def pyproject_requirements() -> dict:
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def pins(text: str) -> dict[str, str]:
    """``name==version`` pins in shell text (quotes and extras allowed): {"torch": "2.14.1", ...}."""
    found = re.findall(r"(?<![\w.\-/])([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+\-]*)", text)
    return {name.lower(): version for name, version in found}


def setup_text(cfg: dict) -> str:
    return "\n".join(cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
                     + cfg.get("worker_setup_commands", []))


def docs_code() -> str:
    """The fenced code blocks of docs/cluster.md, backslash-continued lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", DOC.read_text(), flags=re.S)
    return re.sub(r"\\\n\s*", " ", "\n".join(blocks))


def dockerfile() -> str:
    blocks = re.findall(r"```dockerfile\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/cluster.md documents exactly one Dockerfile"
    return blocks[0]


def job_commands(text: str) -> list[str]:
    """Every ``python jobs/<script>.py ...`` command in a text (shell variables substituted)."""
    out = []
    for line in text.splitlines():
        i = line.find("python jobs/")
        if i < 0:
            continue
        cmd = re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VALUES[m.group(1)], line[i:])
        out.append(shlex.join(shlex.split(cmd, comments=True)))
    return out


def recipe_commands() -> list[tuple[str, str]]:
    header = "\n".join(line for line in CLUSTER.read_text().splitlines() if line.startswith("#"))
    _, job = rayjob_documents()
    found = [("cluster.yaml", c) for c in job_commands(header)]
    found += [("k8s/rayjob.yaml", job["spec"]["entrypoint"])]
    found += [("slurm/attribute.sbatch", c) for c in job_commands(SBATCH.read_text())]
    found += [("docs/cluster.md", c) for c in job_commands(docs_code())]
    return found


def parse_entrypoint(monkeypatch, command: str, ray_address: str | None):
    """Run ``python jobs/<script>.py ARGS`` as ``__main__`` (exactly as the recipe runs it, with
    RAY_ADDRESS set as ``ray job submit`` sets it), the CLI's ``main`` replaced by the real parser
    alone. Returns the parsed namespace; an argument the CLI refuses fails the test."""
    tokens = shlex.split(command)
    assert tokens[0] == "python" and tokens[1].startswith("jobs/"), command
    script = ROOT / tokens[1]
    assert script.is_file(), f"{command!r} names a script that does not exist"
    seen = {}

    def parse_only(argv=None):
        seen["args"] = cli.build_parser().parse_args(argv)
        return 0

    monkeypatch.setattr(cli, "main", parse_only)
    monkeypatch.setattr(sys, "argv", [str(script), *tokens[2:]])
    monkeypatch.setattr(sys, "path", list(sys.path))
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0, f"the CLI refused {command!r}"
    return seen["args"]


# -- cluster.yaml ---------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_schema_with_a_cpu_free_head():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster_config()
    validate_config(prepare_config(cfg))
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}


def test_cluster_yaml_declares_a_gpu_node_type_that_auto_can_see():
    """``gpus_per_worker: auto`` reads the node types' GPUs from this config (copied to the head)
    before any GPU node exists; detection from the instance type happens only if AWS answers."""
    cfg = cluster_config()
    gpu_types = [name for name, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no node type declares resources: {GPU: ...}"
    runner = pytest.importorskip("distributed_attr.runner")
    if hasattr(runner, "_autoscaler_offers_gpus"):
        assert runner._autoscaler_offers_gpus(str(CLUSTER))


def test_cluster_yaml_pins_a_current_image_and_no_secrets():
    text = CLUSTER.read_text()
    assert "latest_dlami" not in re.sub(r"#.*", "", text), "latest_dlami resolves to an end-of-life image"
    images = {t["node_config"]["ImageId"] for t in cluster_config()["available_node_types"].values()}
    assert len(images) == 1 and re.fullmatch(r"ami-[0-9a-f]{8,17}", images.pop())
    assert "aws ssm get-parameter" in text and "describe-images" in text  # how to look one up
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", text, flags=re.I)


def test_cluster_yaml_pins_agree_with_pyproject():
    found = pins(setup_text(cluster_config()))
    for name in ("torch", "torchvision", "ray"):
        assert name in found, f"{name} is not pinned in cluster.yaml's setup commands"
    requirements = pyproject_requirements()
    checked = 0
    for name, version in found.items():
        if name in requirements:
            assert requirements[name].specifier.contains(version, prereleases=True), \
                f"cluster.yaml pins {name}=={version}, pyproject.toml allows {requirements[name]}"
            checked += 1
    assert checked >= 3


def test_cluster_yaml_ships_the_wheel_and_the_token():
    cfg = cluster_config()
    mounts = cfg["file_mounts"]
    wheels = [remote for remote, local in mounts.items() if local.rstrip("/") in ("./dist", "dist")]
    assert wheels, "the locally built wheel (dist/) is not copied to the nodes"
    setup = setup_text(cfg)
    assert f"{wheels[0].rstrip('/')}/distributed_attr-*.whl" in setup and "[s3]" in setup
    assert "pip install -q torch torchvision" not in setup  # no unpinned fallback
    assert any(local.endswith(".ray/auth_token") for local in mounts.values())
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd


@pytest.mark.parametrize("n_wheels", [0, 1, 2])
def test_cluster_yaml_wheel_install_command_in_bash(tmp_path, n_wheels):
    """The setup command that installs the wheel, run by bash as the launcher runs it (in a
    subshell), with uv stubbed: exactly one wheel is installed with its [s3] extra and the pins;
    none or several stop the setup with a message."""
    cfg = cluster_config()
    (remote,) = [r for r, local in cfg["file_mounts"].items() if local.rstrip("/") in ("./dist", "dist")]
    (cmd,) = [c for c in cfg["setup_commands"] if "distributed_attr-*.whl" in c]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in range(n_wheels):
        (wheels / f"distributed_attr-0.{i}.0-py3-none-any.whl").write_bytes(b"")
    uv = tmp_path / ".local" / "bin" / "uv"
    uv.parent.mkdir(parents=True)
    uv.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$HOME/uv-args"\n')
    uv.chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    proc = subprocess.run(["bash", "-c", f"({cmd.replace(remote.rstrip('/'), str(wheels))})"], env=env,
                          capture_output=True, text=True, timeout=30)
    if n_wheels != 1:
        assert proc.returncode != 0 and "expected exactly one distributed_attr wheel" in proc.stderr
        assert not (tmp_path / "uv-args").exists()
        return
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "uv-args").read_text().splitlines()
    assert args[:4] == ["pip", "install", "--python", f"{tmp_path}/venv/bin/python"]
    assert f"{wheels}/distributed_attr-0.0.0-py3-none-any.whl[s3]" in args
    assert {"torch", "torchvision", "ray"} <= set(pins(" ".join(args)))


# -- k8s/rayjob.yaml ----------------------------------------------------------------------------

def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_has_the_fields_kuberay_needs():
    _, job = rayjob_documents()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "jobs/attribute.py" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0" and "dashboard-host" in params
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in [head, *groups]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        for c in containers(group["template"]):
            assert c["name"] and c["image"]
    gpu_groups = []
    for g in groups:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        if any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
               for c in containers(g["template"])):
            gpu_groups.append(g)
    assert gpu_groups, "no worker group's container has nvidia.com/gpu in resources.limits"
    assert cluster["rayVersion"] == pins(setup_text(cluster_config()))["ray"]


def test_rayjob_takes_credentials_from_a_secret_not_the_runtime_env():
    _, job = rayjob_documents()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    for key in runtime_env.get("env_vars", {}):
        assert not key.startswith(("AWS_", "GOOGLE_", "AZURE_")) and not any(w in key.lower() for w in SECRET_WORDS)
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for c in [c for t in templates for c in containers(t)]:
        env = {e["name"]: e for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], (c["name"], name)
    assert not re.search(r"AKIA[0-9A-Z]{16}", RAYJOB.read_text())


def test_rayjob_mounts_the_config_where_the_entrypoint_reads_it(monkeypatch):
    config_map, job = rayjob_documents()
    args = parse_entrypoint(monkeypatch, job["spec"]["entrypoint"], "http://head-svc:8265")
    folder, name = os.path.split(args.config)
    assert name in config_map["data"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    mounts = [m for c in containers(head) for m in c.get("volumeMounts", []) if m["mountPath"] == folder]
    assert mounts, f"nothing is mounted at {folder} in the head pod, where the driver reads {args.config}"
    assert volumes[mounts[0]["name"]]["configMap"]["name"] == config_map["metadata"]["name"]


# -- the job files in the recipes ---------------------------------------------------------------

def recipe_job_files() -> list[tuple[str, dict]]:
    config_map, _ = rayjob_documents()
    files = [("k8s/rayjob.yaml", yaml.safe_load(config_map["data"]["job.yaml"]))]
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    files += [("docs/cluster.md", yaml.safe_load(b)) for b in blocks if "store:" in b]
    return files


@pytest.mark.parametrize("where, raw", [pytest.param(w, r, id=w) for w, r in recipe_job_files()])
def test_recipe_job_files_pass_the_config_validation(where, raw):
    pytest.importorskip("obstore")  # s3:// locations need the [s3] extra
    from distributed_attr.config import Config

    assert raw["store"].startswith("s3://") and raw["data"]["path"].startswith("s3://"), where
    for key in raw.get("storage_options", {}):
        assert not any(w in key.lower() for w in SECRET_WORDS), f"{where}: secret-like storage_options key {key}"
    cfg = Config.from_dict(raw)
    assert cfg.store == raw["store"] and cfg.data.path == raw["data"]["path"]


# -- slurm/attribute.sbatch ---------------------------------------------------------------------

def test_sbatch_is_valid_bash_with_the_usual_pattern():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)
    text = SBATCH.read_text()
    assert "set -euo pipefail" in text
    for option in ("--nodes", "--gpus-per-node", "--time"):
        assert re.search(rf"^#SBATCH {option}=", text, flags=re.M), option
    assert "ray start --head" in text and "ray start --address" in text and "ray status" in text
    assert job_commands(text) and all("jobs/attribute.py" in c for c in job_commands(text))


STUBS = {
    "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "node1\\nnode2\\n"\n',
    "srun": """node=""
while [ $# -gt 0 ]; do
  case "$1" in
    -w) node=$2; shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
echo "$node $*" >> "$STATE/srun.log"
if [ "$1" = hostname ]; then echo "fe80::1 10.0.0.5"; exit 0; fi
exec "$@"
""",
    "ray": """case "$1" in
  start) echo "$*" >> "$STATE/ray-start.log"; touch "$STATE/node.$$"; exec @SLEEP@ 30 >/dev/null 2>&1 ;;
  status)
    n=$(ls "$STATE" | grep -c '^node\\.'); [ "$n" -gt "${FAKE_MAX_NODES:-99}" ] && n=$FAKE_MAX_NODES
    echo "Node status"; echo "Active:"
    for i in $(seq 1 "$n"); do echo " 1 node_$i"; done
    echo "Pending:"; echo " (no pending nodes)" ;;
  *) exit 2 ;;
esac
""",
    "python": """if [ "$1" = -c ]; then exec @PYTHON@ "$@"; fi
printf '%s\\n' "$@" > "$STATE/driver-args"
printf '%s\\n' "RAY_AUTH_MODE=${RAY_AUTH_MODE:-}" "TOKEN_LEN=${#RAY_AUTH_TOKEN}" "PWD=$PWD" > "$STATE/driver-env"
""",
    "sleep": "exec @SLEEP@ 0.05\n",
}


def run_sbatch(tmp_path, **extra_env) -> tuple[subprocess.CompletedProcess, Path]:
    """slurm/attribute.sbatch on this machine, with srun/scontrol/ray/python/sleep stubbed (two
    fake nodes); returns the finished process and the folder the stubs recorded into."""
    real_sleep = shutil.which("sleep")
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body.replace("@SLEEP@", real_sleep).replace("@PYTHON@", sys.executable))
        path.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env.update(HOME=str(tmp_path), STATE=str(state), VENV=str(tmp_path / "venv"), SLURM_JOB_NODELIST="node[1-2]",
               SLURM_CPUS_PER_TASK="32", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(ROOT), **extra_env)
    proc = subprocess.run(["bash", str(SBATCH), "job.yaml"], env=env, capture_output=True, text=True, timeout=120)
    return proc, state


def test_sbatch_starts_ray_on_every_node_then_the_driver(tmp_path, monkeypatch):
    proc, state = run_sbatch(tmp_path)
    assert proc.returncode == 0, proc.stderr
    starts = (state / "ray-start.log").read_text().splitlines()
    assert len(starts) == 2
    head, worker = sorted(starts, key=lambda s: "--head" not in s)
    assert set(head.split()) >= {"start", "--head", "--node-ip-address=10.0.0.5", "--port=6379", "--num-cpus=32",
                                 "--num-gpus=4", "--block"}
    assert set(worker.split()) >= {"start", "--address=10.0.0.5:6379", "--num-cpus=32", "--num-gpus=4", "--block"}
    srun = (state / "srun.log").read_text()
    assert "node1 ray start --head" in srun and "node2 ray start --address" in srun
    args = (state / "driver-args").read_text().splitlines()
    assert args == ["jobs/attribute.py", "job.yaml", "--address", "10.0.0.5:6379", "--resume"]
    env = (state / "driver-env").read_text().splitlines()
    assert env == ["RAY_AUTH_MODE=token", "TOKEN_LEN=64", f"PWD={ROOT}"]
    parsed = parse_entrypoint(monkeypatch, shlex.join(["python", *args]), None)
    assert parsed.command == "run" and parsed.address == "10.0.0.5:6379" and parsed.resume


def test_sbatch_gives_up_when_nodes_do_not_join(tmp_path):
    proc, state = run_sbatch(tmp_path, FAKE_MAX_NODES="1", RAY_WAIT_S="1")
    assert proc.returncode == 1
    assert "only 1 of 2 Ray nodes joined within 1s" in proc.stderr
    assert not (state / "driver-args").exists()


# -- every entrypoint, through the real parser ----------------------------------------------------

@pytest.mark.parametrize("where, command", [pytest.param(w, c, id=f"{w}:{c.split()[1]}:{i}")
                                             for i, (w, c) in enumerate(recipe_commands())])
def test_recipe_entrypoints_parse_with_the_cli(monkeypatch, where, command):
    ray_address = None if "--address" in command else "http://127.0.0.1:8265"  # ray job submit sets it
    args = parse_entrypoint(monkeypatch, command, ray_address)
    if "jobs/attribute.py" in command:
        assert args.command == "run" and args.config.endswith("job.yaml")
    else:
        assert args.command == "aggregate" and args.store.startswith("s3://") and args.json
    assert args.address in ("auto", "10.0.0.5:6379")


def test_every_recipe_names_an_entrypoint():
    where = {w for w, _ in recipe_commands()}
    assert where == {"cluster.yaml", "k8s/rayjob.yaml", "slurm/attribute.sbatch", "docs/cluster.md"}


# -- docs/cluster.md ------------------------------------------------------------------------------

def test_docs_dockerfile_matches_the_pins():
    text = dockerfile()
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 6
    _, job = rayjob_documents()
    ray_version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.match(rf"FROM rayproject/ray:{re.escape(ray_version)}-py311", lines[0])
    cluster_pins = pins(setup_text(cluster_config()))
    docker_pins = pins(text)
    for name in ("torch", "torchvision", "ray", "zarr"):
        assert docker_pins.get(name) == cluster_pins.get(name), name
    assert "[s3]" in text and "/app/jobs/" in text
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"


def test_docs_walk_through_each_recipe():
    text = DOC.read_text()
    for step in ("python -m build --wheel", "ray up cluster.yaml", "ray dashboard cluster.yaml",
                 "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/attribute.py job.yaml",
                 "ray down cluster.yaml", "kubectl apply -f k8s/rayjob.yaml", "sbatch slurm/attribute.sbatch",
                 "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled", "gpus_per_worker", "placement_timeout",
                 "storage_options", "What is checked here"):
        assert step in text, step
