"""Cluster configs under cluster/: schema-valid, consistent with the emu3-gen-a100 preset, not exposed.

The launcher YAML is checked against the JSON schema inside the installed ``ray``
package (and Ray's own validate_config); the KubeRay manifests by kind, GPU resources,
image/entrypoint and shared storage. The entrypoint is parsed by the real stage CLI.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import yaml

from cca_ray.cli import stage_parser
from cca_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-a100.yaml"
KUBERAY = CLUSTER / "kuberay"
SHARED = PurePosixPath("/mnt/shared")
PRESET = "emu3-gen-a100"
GPUS_PER_NODE = 8


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.exists(), f"ray {ray.__version__} no longer ships {path}"
    return json.loads(path.read_text())


def manifests() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(KUBERAY.glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in manifests() if d["kind"] == kind]


def strings(node) -> list[str]:
    """Every string anywhere in a parsed YAML tree (keys included)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def preset():
    return load_config(PRESET)


def under_shared(path: str | None) -> bool:
    return path is not None and PurePosixPath(path).is_relative_to(SHARED)


def image_ray_version(image: str) -> str:
    m = re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", image)
    assert m, f"not a rayproject/ray image: {image}"
    return m.group(1)


# -- cluster launcher ---------------------------------------------------------------------
def test_launcher_validates_against_rays_schema():
    cfg, schema = launcher(), ray_schema()
    jsonschema.validate(cfg, schema)
    typo = copy.deepcopy(cfg)
    typo["available_node_types"]["gpu_a100_80g"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):  # the schema does bite
        jsonschema.validate(typo, schema)


def test_launcher_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_launcher_keeps_control_plane_private():
    cfg = launcher()
    text = " ".join(strings(cfg))
    assert "0.0.0.0" not in text, "nothing may listen on, or be opened to, 0.0.0.0"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert cfg["provider"]["use_internal_ips"] is True
    # no security group rule of Ray's making: ours admits SSH from a VPN only (README)
    for name, node_type in cfg["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), f"{name}: set SecurityGroupIds"
    for perm in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r.get("CidrIp") != "0.0.0.0/0" for r in perm.get("IpRanges", []))


def test_launcher_fits_the_preset_and_shares_storage():
    cfg, pc = launcher(), preset()
    gpu_types = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")}
    assert list(gpu_types) == ["gpu_a100_80g"]
    gpu = gpu_types["gpu_a100_80g"]
    assert gpu["resources"]["GPU"] == GPUS_PER_NODE and gpu["node_config"]["InstanceType"] == "p4de.24xlarge"
    assert gpu["max_workers"] * GPUS_PER_NODE >= pc.train.num_workers
    assert gpu["resources"]["CPU"] >= GPUS_PER_NODE * pc.train.cpus_per_worker
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    # the shared file system is mounted on every host and passed into the container
    assert f"-v {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    mount = next(c for c in cfg["initialization_commands"] if "mount -t nfs4" in c)
    assert mount.split()[-1] == str(SHARED) and cfg["provider"]["region"] in mount
    assert any(o.startswith("--env MLFLOW_TRACKING_URI=http") for o in cfg["docker"]["run_options"])
    assert any("pip install" in c and "~/cca-ray" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/cca-ray"] == "."


# -- KubeRay ------------------------------------------------------------------------------
def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def check_ray_cluster_spec(spec: dict, where: str, *, autoscaled: bool) -> None:
    pc = preset()
    (pvc_file, pvc), = by_kind("PersistentVolumeClaim")
    launcher_ray = image_ray_version(launcher()["docker"]["image"])
    assert spec["rayVersion"] == launcher_ray, f"{where}: rayVersion != launcher image's Ray"
    assert spec["authOptions"]["mode"] == "token", f"{where}: token auth must be on"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head Service must stay ClusterIP"
    assert head["rayStartParams"].get("num-cpus") == "0"
    for name, pod in _pod_specs(spec):
        assert not pod.get("hostNetwork"), f"{where}/{name}: hostNetwork exposes Ray ports on the node"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert list(claims.values()) == [pvc["metadata"]["name"]], f"{where}/{name}: shared PVC ({pvc_file})"
        for c in pod["containers"]:
            assert c["image"] == pod_image(), f"{where}/{name}: one image everywhere"
            assert all("hostPort" not in p for p in c.get("ports", []))
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert re.match(r"https?://", env.get("MLFLOW_TRACKING_URI", "")), f"{where}/{name}: MLflow server URI"
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert [mounts.get(v) for v in claims] == [str(SHARED)], f"{where}/{name}: PVC at {SHARED}"
            assert mounts.get("dshm") == "/dev/shm"
            assert {"name": "metrics", "containerPort": 8080} in c["ports"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert len(gpu_groups) == 1, f"{where}: one GPU worker group"
    g = gpu_groups[0]
    res = g["template"]["spec"]["containers"][0]["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == GPUS_PER_NODE == int(res["requests"]["nvidia.com/gpu"])
    assert float(res["limits"]["cpu"]) >= GPUS_PER_NODE * pc.train.cpus_per_worker
    assert g["maxReplicas"] * GPUS_PER_NODE >= pc.train.num_workers, f"{where}: room for train.num_workers GPUs"
    assert g["rayStartParams"]["metrics-export-port"] == "8080" == head["rayStartParams"]["metrics-export-port"]
    assert "A100" in g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    if not autoscaled:
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"], f"{where}: a job's cluster is fixed-size"


def pod_image() -> str:
    (_, rc), = by_kind("RayCluster")
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_kuberay_manifest_kinds():
    kinds = sorted(d["kind"] for _, d in manifests())
    assert kinds == ["PersistentVolumeClaim", "PodMonitor", "RayCluster", "RayJob"]
    for f, d in manifests():
        if d["kind"].startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1", f


def test_raycluster():
    (f, rc), = by_kind("RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    check_ray_cluster_spec(rc["spec"], f, autoscaled=True)


def test_rayjob_runs_the_tune_stage_on_shared_storage():
    (f, job), = by_kind("RayJob")
    spec = job["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], f, autoscaled=False)
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "cca_ray.tune"]
    args = stage_parser("tune", "").parse_args(argv[3:])  # the real CLI accepts it
    cfg = load_config(args.preset, args.config, args.overrides, workdir=args.workdir)
    assert cfg.preset == PRESET
    # workdir (checkpoints, Tune experiment, MLflow fallback) and the preset's inputs are shared
    for what, path in [("--workdir", args.workdir), ("data.path", cfg.data.path),
                       ("model.path", cfg.model.path), ("tokenizer.path", cfg.tokenizer.path)]:
        assert under_shared(path), f"{f}: {what}={path} is not on the shared volume {SHARED}"
    assert cfg.train.use_gpu


def test_shared_pvc_and_podmonitor():
    (_, pvc), = by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every node writes checkpoints: RWX"
    (_, pm), = by_kind("PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}


def test_images_agree_on_the_ray_version():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_IMAGE=(\S+)", dockerfile, re.M)
    assert m and image_ray_version(m.group(1)) == image_ray_version(launcher()["docker"]["image"])
    # the client that runs `ray up` / `ray job submit` and the tests run the same Ray
    assert image_ray_version(m.group(1)) == ray.__version__, "bump the cluster images with the Ray pin"


def test_readme_covers_commands_and_placeholders():
    readme = (CLUSTER / "README.md").read_text()
    (_, job), = by_kind("RayJob")
    assert job["spec"]["entrypoint"] in readme
    for cmd in ("ray up cluster/aws-a100.yaml", "ray dashboard cluster/aws-a100.yaml", "ray job submit",
                "kubectl apply", "kubectl port-forward", "MLFLOW_TRACKING_URI", "storage_path"):
        assert cmd in readme, cmd
    placeholders = set()
    for f in [LAUNCHER, *KUBERAY.glob("*.yaml")]:
        placeholders |= set(re.findall(r"[\w.-]*REPLACE_ME[\w.-]*", f.read_text()))
    assert placeholders, "expected the launcher's REPLACE_ME placeholders"
    missing = sorted(p for p in placeholders if p not in readme)
    assert not missing, f"explain these placeholders in cluster/README.md: {missing}"
