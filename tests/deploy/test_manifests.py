"""Every manifest and config in deploy/ parses and validates offline: Kubernetes resources
against the Kubernetes schemas bundled with `kubernetes-validate` (strict: unknown fields are
errors), KubeRay's RayCluster/RayJob against their schema (tests/deploy/schemas, from KubeRay's
API types), the Ray cluster launcher config against the schema inside the installed ray (and
ray's own `validate_config`, as `ray up` runs it). Then what no schema sees: names one
manifest uses that another must define, commands whose flags `specmill` must accept, and the
job and training files that the factory and trainer must load."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.37"  # the newest the installed kubernetes-validate bundles; 1.30+ read the same fields
KUBERAY_KINDS = {"RayCluster": "raycluster-ray-v1.json", "RayJob": "rayjob-ray-v1.json"}


# --------------------------------------------------------------------------- loading + validators


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


K8S_FILES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
RAY_LAUNCHER_FILES = sorted((DEPLOY / "ray").glob("*.yaml"))
ALL_DOCS = [(path, i, doc) for path in K8S_FILES for i, doc in enumerate(documents(path))]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, _, doc in ALL_DOCS if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def _k8s_registry() -> Registry:
    """kubernetes-validate's strict definitions, for the $refs of the KubeRay schemas."""
    import importlib.resources

    version = [v for v in kubernetes_validate.utils.all_versions() if v.startswith(K8S_VERSION)][-1]
    definitions = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json")
    return Resource.from_contents(json.loads(definitions.read_text())) @ Registry()


def validate(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError (or kubernetes_validate's) if `doc` breaks its schema."""
    if doc["kind"] in KUBERAY_KINDS:
        schema = json.loads((SCHEMAS / KUBERAY_KINDS[doc["kind"]]).read_text())
        jsonschema.Draft202012Validator(schema, registry=_k8s_registry()).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def launcher_schema() -> dict[str, Any]:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def validate_launcher(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks, offline


# --------------------------------------------------------------------------- schemas


def test_every_file_in_deploy_is_covered_by_a_check():
    covered = set(K8S_FILES) | set(RAY_LAUNCHER_FILES) | set((DEPLOY / "docker").glob("Dockerfile.*"))
    covered |= set((DEPLOY / "docker").glob("*.dockerignore")) | {DEPLOY / "docker" / ".hadolint.yaml"}
    covered |= {DEPLOY / "README.md"}  # the operations guide: its links and paths, tests/test_docs.py
    files = {p for p in DEPLOY.rglob("*") if p.is_file()}
    assert files - covered == set(), "a file in deploy/ that no test checks"
    assert K8S_FILES and RAY_LAUNCHER_FILES


@pytest.mark.parametrize("path, index, doc", ALL_DOCS, ids=[f"{p.name}:{i}:{d['kind']}" for p, i, d in ALL_DOCS])
def test_each_kubernetes_resource_validates_against_its_schema(path, index, doc):
    validate(doc)


@pytest.mark.parametrize("path", RAY_LAUNCHER_FILES, ids=[p.name for p in RAY_LAUNCHER_FILES])
def test_the_ray_cluster_launcher_config_validates_against_rays_schema(path):
    validate_launcher(yaml.safe_load(path.read_text()))


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = dotted.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is _DELETE:
        del node[leaf]
    elif leaf.isdigit():
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return doc


_DELETE = object()
BROKEN = [
    ("Deployment", "specmill-service", "spec.replicas", "two"),
    ("Deployment", "specmill-service", "spec.template.spec.containers.0.imagePullPolicyy", "Always"),
    ("StatefulSet", "specmill-postgres", "spec.selector", _DELETE),
    ("Job", "specmill-train", "spec.completionMode", 3),
    ("PersistentVolumeClaim", "specmill-data", "spec.accessModes", "ReadWriteMany"),
    ("RayCluster", "specmill-factory", "spec.workerGroupSpecs.0.maxReplica", 8),
    ("RayCluster", "specmill-factory", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits",
     {"nvidia.com/gpu": [1]}),
    ("RayCluster", "specmill-factory", "spec.headGroupSpec.rayStartParams.num-cpus", 0),
    ("RayCluster", "specmill-factory", "spec.autoscalerOptions.upscalingMode", "Fast"),
    ("RayJob", "specmill-factory-chat", "spec.submissionMode", "Batch"),
    ("RayJob", "specmill-factory-chat", "spec.entrypoint", ["specmill", "factory"]),
]


@pytest.mark.parametrize("kind, name, field, value", BROKEN, ids=[f"{k}.{f}" for k, _, f, _ in BROKEN])
def test_a_broken_manifest_is_rejected(kind, name, field, value):
    doc = _set(one(kind, name), field, value)
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


@pytest.mark.parametrize("field, value", [
    ("available_node_types.vllm.resources.GPU", 0.5),  # Ray resources in the launcher are integers
    ("head_node_type", "gpu"),  # not a node type
    ("docker.imagee", "x"),  # unknown key
    ("available_node_types.vllm.node_config", _DELETE),  # a node type needs its instance config
])
def test_a_broken_launcher_config_is_rejected(field, value):
    config = _set(yaml.safe_load(RAY_LAUNCHER_FILES[0].read_text()), field, value)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_launcher(config)


# --------------------------------------------------------------------------- references between manifests


def _walk(node: Any, key: str):
    """Every value stored under `key` anywhere in `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_every_secret_claim_and_config_map_a_pod_uses_is_defined():
    secrets = {(s["metadata"]["name"], k) for s in by_kind("Secret") for k in s.get("stringData", {})}
    claims = {c["metadata"]["name"] for c in by_kind("PersistentVolumeClaim")}
    maps = {c["metadata"]["name"] for c in by_kind("ConfigMap")}
    docs = [doc for _, _, doc in ALL_DOCS]
    used_secrets = {(r["name"], r["key"]) for r in _walk(docs, "secretKeyRef")}
    assert used_secrets and used_secrets <= secrets, used_secrets - secrets
    used_claims = {r["claimName"] for r in _walk(docs, "persistentVolumeClaim")}
    assert used_claims and used_claims <= claims, used_claims - claims
    used_maps = {r["name"] for r in _walk(docs, "configMap")}
    assert used_maps and used_maps <= maps, used_maps - maps


def test_every_service_selects_the_pods_it_fronts():
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind("Deployment") + by_kind("StatefulSet")
                 + by_kind("Job")]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service["metadata"]["name"]


def test_the_ray_worker_groups_have_consistent_autoscaling_bounds_and_the_images_ray():
    import ray

    cluster = one("RayCluster", "specmill-factory")["spec"]
    assert cluster["rayVersion"] == ray.__version__, "rayVersion must be the ray the image installs"
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"vllm", "capture"}
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1, "one GPU per vLLM replica / capture actor"


def _ray_token_holders() -> list[str]:
    """Containers that talk to Ray and so need the cluster's auth token."""
    cluster = one("RayCluster", "specmill-factory")["spec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    pods += [one("RayJob", "specmill-factory-chat")["spec"]["submitterPodTemplate"],
             one("Deployment", "specmill-service")["spec"]["template"]]
    envs = [c.get("env", []) for p in pods for c in p["spec"]["containers"]] + [cluster["autoscalerOptions"]["env"]]
    return [next((e["valueFrom"]["secretKeyRef"]["key"] for e in env if e["name"] == "RAY_AUTH_TOKEN"), "")
            for env in envs]


def test_every_ray_client_and_node_gets_the_same_auth_token():
    assert set(_ray_token_holders()) == {"ray-auth-token"}


# --------------------------------------------------------------------------- commands and embedded configs


def _parse_specmill(argv: list[str]):
    from shared.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"specmill rejects {argv}") from e


def test_the_service_command_is_one_specmill_serve_accepts_and_points_at_the_manifests_hosts():
    container = one("Deployment", "specmill-service")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["specmill", "serve"]
    args = _parse_specmill(container["args"][1:])
    assert args.host == "0.0.0.0" and args.port == container["ports"][0]["containerPort"]
    assert re.fullmatch(r"http://specmill-factory-head-svc:8265", args.ray_address)  # KubeRay's <name>-head-svc
    assert one("RayCluster", "specmill-factory")
    db_host = re.search(r"@([^:/]+):5432/", args.db).group(1)
    assert one("Service", db_host)["spec"]["ports"][0]["port"] == 5432
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {str(args.data_root), *map(str, args.input_roots)} <= mounts


def test_the_rayjob_runs_the_job_file_it_mounts_on_the_selected_cluster(tmp_path):
    job = one("RayJob", "specmill-factory-chat")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": "specmill-factory"}
    argv = shlex.split(job["entrypoint"])
    args = _parse_specmill(argv[1:])
    head = one("RayCluster", "specmill-factory")["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "factory-jobs")
    job_file = Path(args.job)
    assert job_file.parent == Path(mount["mountPath"])
    files = one("ConfigMap", "specmill-factory-jobs")["data"]
    assert job_file.name in files
    # The job file is one the factory loads: every key known, every value valid.
    from factory.job import load_job

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "job.toml").write_text(files[job_file.name])
    loaded = load_job(tmp_path / "job.toml", {"model": str(tmp_path)})
    assert loaded.ray.address == "auto" and loaded.ray.scheduling == "SPREAD"
    assert loaded.capture.num_gpus == 1 and loaded.servers.num_gpus == 1
    groups = {g["groupName"]: g for g in one("RayCluster", "specmill-factory")["spec"]["workerGroupSpecs"]}
    assert loaded.servers.replicas <= groups["vllm"]["maxReplicas"]
    assert loaded.ray.capture_actors <= groups["capture"]["maxReplicas"]


def test_the_trainer_job_runs_torchrun_over_every_pod_and_gpu_with_a_config_the_trainer_loads(tmp_path):
    job = one("Job", "specmill-train")["spec"]
    container = job["template"]["spec"]["containers"][0]
    argv = shlex.split(container["args"][0])
    assert argv[:2] == ["exec", "torchrun"]
    flags = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    assert int(flags["--nnodes"]) == job["completions"] == job["parallelism"]
    assert int(flags["--nproc-per-node"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert flags["--node-rank"] == "${JOB_COMPLETION_INDEX}" and job["completionMode"] == "Indexed"
    assert flags["--master-addr"] == f"{one('Job', 'specmill-train')['metadata']['name']}-0." \
                                      f"{job['template']['spec']['subdomain']}"
    assert one("Service", job["template"]["spec"]["subdomain"])["spec"]["clusterIP"] == "None"
    module = argv.index("-m")
    assert argv[module + 1] == "shared.cli"
    args = _parse_specmill(argv[module + 2:])
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert Path(args.config).parent == Path(config_mount["mountPath"])
    from trainer.config import load_config

    (tmp_path / "train.toml").write_text(one("ConfigMap", "specmill-train-config")["data"][Path(args.config).name])
    config = load_config(tmp_path / "train.toml")
    assert config.device == "cuda" and str(config.data.path).startswith("/data/")
