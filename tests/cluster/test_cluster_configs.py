"""The cluster configs in cluster/ are valid, offline (no network, no cloud credentials).

Launcher configs (aws-gpu.yaml, gcp-gpu.yaml): Ray's own validation, the part of `ray up`
(ray.autoscaler._private.commands._bootstrap_config) that needs no cloud SDK:
``prepare_config`` (merges ray/autoscaler/{aws,gcp}/defaults.yaml, merges setup commands, checks the
docker section, fills per-type min/max workers), then ``validate_config`` (jsonschema against
ray/autoscaler/ray-schema.json, head_node_type, the min_workers sum). What comes after that in
`ray up`, the provider bootstrap (IAM, subnets, key pairs), needs boto3 / googleapiclient and
credentials, and is not run.

RayJob manifest (kuberay-rayjob.yaml): no KubeRay CRD schema ships with the installed packages, so
these are structural checks; set TSCRAY_KUBERAY_CRD to a copy of KubeRay's
ray-operator/config/crd/bases/ray.io_rayjobs.yaml to validate against the CRD's schema as well.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray_util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER = {"aws-gpu.yaml": "aws", "gcp-gpu.yaml": "gcp"}
RAYJOB = "kuberay-rayjob.yaml"
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py3\d+)(?P<gpu>-gpu)?$")


def load(name: str) -> dict:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before touching the cloud; raises on an invalid one."""
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def index_of(commands: list[str], needle: str) -> int:
    hits = [i for i, c in enumerate(commands) if needle in c]
    assert hits, f"no command contains {needle!r}"
    return hits[0]


# --- Ray cluster-launcher configs -------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation(name):
    prepared = ray_validate(load(name))
    assert prepared["provider"]["type"] == LAUNCHER[name]
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config merged setup_commands into both lists: tscray reaches every node.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("TSCRAY_PIP_SPEC" in c for c in prepared[key])


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: c.update(min_workerz=1), jsonschema.ValidationError),  # unknown top-level key
        (lambda c: worker_types(c)[next(iter(worker_types(c)))].update(max_worker=2),
         jsonschema.ValidationError),  # unknown key in a node type
        (lambda c: worker_types(c)[next(iter(worker_types(c)))].pop("resources"),
         jsonschema.ValidationError),  # required key of a node type
        (lambda c: c["docker"].update(imag="x"), jsonschema.ValidationError),
        (lambda c: c.update(head_node_type="no-such-type"), ValueError),
        (lambda c: worker_types(c)[next(iter(worker_types(c)))].update(min_workers=c["max_workers"] + 1),
         ValueError),  # sum of min_workers > max_workers
    ],
    ids=["top-level-key", "node-type-key", "missing-resources", "docker-key", "head-type", "min-workers-sum"],
)
def test_ray_validation_rejects_broken_config(name, break_it, error):
    config = load(name)
    break_it(config)
    with pytest.raises(error):
        ray_validate(config)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_gpu_workers(name):
    config = load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "trials stay off the head"
    workers = worker_types(config)
    assert workers
    for node_type, spec in workers.items():
        assert spec["max_workers"] >= 1 and spec["min_workers"] == 0, node_type
        node = spec["node_config"]
        if LAUNCHER[name] == "aws":
            assert re.match(r"^(g\d|p\d)", node["InstanceType"]), node_type  # GPU instance families
            assert "ray-autoscaler-v1" in node["IamInstanceProfile"]["Arn"], "workers need S3 access"
        else:
            # GCP does not auto-detect resources; GPUs come from guestAccelerators or the machine type.
            assert spec["resources"]["GPU"] >= 1, node_type
            assert node.get("guestAccelerators") or node["machineType"].startswith(("a2-", "a3-", "g2-"))
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"  # required with GPUs
            assert node["serviceAccounts"][0]["email"].startswith("ray-autoscaler-sa-v1@")


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_commands(name):
    config = load(name)
    setup = config["setup_commands"]
    # A CUDA torch before tscray, so tscray's torch requirement does not pull another build.
    assert index_of(setup, "torch==") < index_of(setup, "TSCRAY_PIP_SPEC")
    assert "torchvision==" in setup[index_of(setup, "torch==")]
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "MLFLOW_TRACKING_URI" in head and "MLFLOW_TRACKING_URI" in worker
    mlflow = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c).split()
    assert mlflow[mlflow.index("--host") + 1] == "0.0.0.0" and mlflow[mlflow.index("--port") + 1] == "5000"
    assert mlflow[mlflow.index("--backend-store-uri") + 1].strip('"').startswith("sqlite:///")
    scheme = {"aws": "s3://", "gcp": "gs://"}[LAUNCHER[name]]
    assert mlflow[mlflow.index("--default-artifact-root") + 1].startswith(scheme)
    assert Path(config["file_mounts"]["~/sweeps"]).parts == ("sweeps",)


# --- KubeRay RayJob ------------------------------------------------------------------------------

# Field names of RayJobSpec and RayClusterSpec in KubeRay's ray.io/v1 CRD (v1.7): a misspelt key
# would be dropped or refused by the API server.
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYCLUSTER_SPEC_KEYS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}


def load_rayjob() -> dict:
    with open(CLUSTER / RAYJOB) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1
    return docs[0]


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def rayjob_problems(doc: dict) -> list[str]:
    """Everything wrong with a tscray RayJob manifest, as messages (empty: fine)."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        problems.append("not a ray.io/v1 RayJob")
    spec = doc.get("spec", {})
    problems += [f"unknown spec key {k}" for k in set(spec) - RAYJOB_SPEC_KEYS]
    cluster = spec.get("rayClusterSpec", {})
    problems += [f"unknown rayClusterSpec key {k}" for k in set(cluster) - RAYCLUSTER_SPEC_KEYS]

    argv = shlex.split(spec.get("entrypoint", ""))
    if argv[:2] != ["tscray", "sweep"] or len(argv) < 3:
        problems.append("entrypoint does not run `tscray sweep SPEC`")
    storage = argv[argv.index("--storage") + 1] if "--storage" in argv[:-1] else ""
    if not re.match(r"^(s3|gs)://", storage):
        problems.append("--storage is not a shared object-store URI")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true")

    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    pip = runtime_env.get("pip", [])
    if not any(p.startswith("tscray") for p in pip) or not any(p.startswith("torch==") for p in pip):
        problems.append("runtimeEnvYAML does not pip-install torch and tscray")
    if "env_vars" in runtime_env:  # Ray refuses to merge them with the driver's ray.init(runtime_env)
        problems.append("runtimeEnvYAML sets env_vars")

    head = cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})
    head_containers = head.get("containers", [])
    if any(gpus(c) for c in head_containers):
        problems.append("head requests GPUs")
    spec_dir = str(Path(argv[2]).parent) if len(argv) > 2 else None
    config_maps = {v["name"] for v in head.get("volumes", []) if "configMap" in v}
    mounted = {m["mountPath"] for c in head_containers for m in c.get("volumeMounts", [])
               if m["name"] in config_maps}
    if spec_dir not in mounted:
        problems.append(f"no ConfigMap mounted on the head at {spec_dir} (the sweep spec)")

    groups = cluster.get("workerGroupSpecs", [])
    if not any(gpus(c) >= 1 for g in groups for c in g["template"]["spec"]["containers"]):
        problems.append("no worker group with nvidia.com/gpu limits")
    images = [c["image"] for c in head_containers]
    images += [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    versions = {m["ray"] for m in map(IMAGE_RE.match, images) if m}
    if len(versions) != 1 or len(images) != sum(bool(IMAGE_RE.match(i)) for i in images) \
            or versions != {cluster.get("rayVersion")}:
        problems.append(f"images {images} do not all match rayVersion {cluster.get('rayVersion')}")
    return problems


def test_rayjob_manifest():
    assert rayjob_problems(load_rayjob()) == []


def _drop_gpu(doc):
    for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            c["resources"]["limits"].pop("nvidia.com/gpu")


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        lambda d: d["spec"].update(entrypoint="python -m tscray.cli sweep /sweeps/ablation.yaml"),
        lambda d: d["spec"].update(entrypoint="tscray sweep /sweeps/ablation.yaml --storage /tmp/s"),
        lambda d: d["spec"].pop("shutdownAfterJobFinishes"),
        lambda d: d["spec"].update(shutdownAfterJobFinsihes=True),
        _drop_gpu,
        lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.9.0"),
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].pop("volumes"),
        lambda d: d["spec"].update(runtimeEnvYAML=d["spec"]["runtimeEnvYAML"] + "env_vars: {A: '1'}\n"),
    ],
    ids=["api-version", "entrypoint", "local-storage", "no-shutdown", "typo", "no-gpu", "version",
         "no-configmap", "env-vars"],
)
def test_rayjob_checks_catch_broken_manifest(break_it):
    doc = load_rayjob()
    break_it(doc)
    assert rayjob_problems(doc)


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would drop or refuse (`kubectl apply --validate=strict`)."""
    out = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            out += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            out += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.skipif(not os.environ.get("TSCRAY_KUBERAY_CRD"),
                    reason="set TSCRAY_KUBERAY_CRD to KubeRay's ray.io_rayjobs.yaml to check the CRD schema")
def test_rayjob_matches_kuberay_crd():
    with open(os.environ["TSCRAY_KUBERAY_CRD"]) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    doc = load_rayjob()
    jsonschema.validate(doc, schema)
    assert unknown_fields(doc, schema) == []


# --- all of cluster/ -----------------------------------------------------------------------------


def test_images_agree_across_configs():
    """One Ray/Python version everywhere: the launcher configs' images and the RayJob's."""
    images = set()
    for name in LAUNCHER:
        docker = load(name)["docker"]
        images |= {docker["image"], docker["head_image"]}
    doc = load_rayjob()["spec"]["rayClusterSpec"]
    images |= {c["image"] for c in doc["headGroupSpec"]["template"]["spec"]["containers"]}
    images |= {c["image"] for g in doc["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    matches = [IMAGE_RE.match(i) for i in images]
    assert all(matches), images
    assert {(m["ray"], m["py"]) for m in matches} == {(doc["rayVersion"], matches[0]["py"])}


def test_placeholders_are_documented():
    readme = (CLUSTER / "README.md").read_text()
    found = set()
    for path in CLUSTER.glob("*.yaml"):
        found |= set(re.findall(r"\bYOUR_[A-Z_]+\b", path.read_text()))
    assert found, "expected placeholders such as YOUR_BUCKET"
    assert sorted(p for p in found if p not in readme) == []
