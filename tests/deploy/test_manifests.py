"""deploy/k8s: the Kubernetes manifests, checked without a cluster or a network.

- Every resource (the kustomize base and GPU overlay rendered, the adapter rules, the LeaderWorkerSet's
  pod templates and Service) validates strictly against the Kubernetes API schemas that
  kubernetes-validate ships, for the oldest and newest Kubernetes the manifests are meant for. The
  LeaderWorkerSet itself is a CRD without a schema there: test_lws.py checks it.
- Every environment variable a manifest sets is a launcher setting or a listed pass-through, with a value
  the launcher accepts; probes hit routes the router serves; grace periods cover the launcher's drain;
  the HPA's metric is the one the adapter rule serves and the router exports.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from launch.adapters import parse_lora_adapters
from launch.settings import Settings
from launch.supervision import KILL_GRACE_S
from router.limits import Limits
from router.metrics import Metrics
from router.metrics import render as render_metrics
from router.routes import HEALTH_TIMEOUT_S, setup_routes
from tests.deploy.deploy_files import (
    ADAPTER_RULES,
    K8S,
    K8S_VERSIONS,
    KUSTOMIZE_DIRS,
    LWS,
    LWS_DOCS,
    LWS_EXPANSION_ENV,
    LWS_FILE,
    PASS_THROUGH_ENV,
    RENDERED,
    ROOT,
    SETTINGS_ENV,
    TARGETS,
    WORKER_SHUTDOWN_GRACE_S,
    container_env,
    containers,
    default_setting,
    dockerfile_env,
    dockerfile_env_paths,
    dockerfile_user,
    kustomize_build,
    load_yaml,
    pod_specs,
)

# ---- schemas -------------------------------------------------------------------------------------


def schema_checked() -> list[tuple[str, dict[str, Any]]]:
    """(label, resource) for everything the shipped schemas cover: all but the LeaderWorkerSet, whose
    leader and worker templates are checked as core PodTemplates."""
    checked = [
        (f"{target}: {r['kind']}/{r['metadata']['name']}", r) for target, rs in RENDERED.items() for r in rs
    ]
    checked += [(f"{ADAPTER_RULES.name}: {r['kind']}", r) for r in load_yaml(ADAPTER_RULES)]
    checked += [(f"lws: {r['kind']}", r) for r in LWS_DOCS if r["kind"] != "LeaderWorkerSet"]
    for role in ("leaderTemplate", "workerTemplate"):
        template = LWS["spec"]["leaderWorkerTemplate"][role]
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": role.lower()},
            "template": template,
        }
        checked.append((f"lws: {role} as a PodTemplate", wrapped))
    return checked


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("label", "resource"), schema_checked(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_resource_matches_kubernetes_schema(label: str, resource: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(resource, version, strict=True)


def test_schema_validation_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(next(r for r in RENDERED["base"] if r["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_every_manifest_file_is_checked() -> None:
    used = {ADAPTER_RULES, LWS_FILE}
    for directory in KUSTOMIZE_DIRS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used |= {directory / e for e in kustomization["resources"] if (directory / e).is_file()}
        used |= {directory / p["path"] for p in kustomization.get("patches", [])}
        used.add(directory / "kustomization.yaml")
    assert set(K8S.rglob("*.yaml")) == used


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=lambda d: d.relative_to(K8S).as_posix())
def test_render_equals_kubectl_kustomize(directory: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    key = lambda r: (r["kind"], r["metadata"]["name"])  # noqa: E731
    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
    ours = sorted(kustomize_build(directory), key=key)
    assert json.dumps(ours, sort_keys=True, indent=1) == json.dumps(theirs, sort_keys=True, indent=1)


# ---- environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_env_vars_are_settings_or_pass_through(target: str) -> None:
    allowed = SETTINGS_ENV | set(PASS_THROUGH_ENV) | (set(LWS_EXPANSION_ENV) if target == "lws" else set())
    for container in containers(TARGETS[target]):
        unknown = set(container_env(container, TARGETS[target])) - allowed
        assert not unknown, f"{target}: not a launcher setting: {sorted(unknown)}"


@pytest.mark.parametrize("target", TARGETS)
def test_env_values_parse_as_settings(target: str) -> None:
    for container in containers(TARGETS[target]):
        literal = {
            name.lower(): value
            for name, value in container_env(container, TARGETS[target]).items()
            if name in SETTINGS_ENV and isinstance(value, str) and "$(" not in value
        }
        Settings(**literal)  # raises on a value the launcher would reject


def test_env_check_rejects_an_unknown_variable() -> None:
    deployment = next(r for r in RENDERED["base"] if r["kind"] == "Deployment")
    container = copy.deepcopy(deployment["spec"]["template"]["spec"]["containers"][0])
    container["env"].append({"name": "NUM_SHARDS", "value": "2"})
    assert "NUM_SHARDS" in set(container_env(container, RENDERED["base"])) - SETTINGS_ENV


def test_configmap_holds_the_served_model_and_adapters() -> None:
    (configmap,) = [r for r in RENDERED["base"] if r["kind"] == "ConfigMap"]
    assert {"MODEL_ID", "NUM_SHARD", "LORA_ADAPTERS"} <= set(configmap["data"])
    for spec in parse_lora_adapters(configmap["data"]["LORA_ADAPTERS"]):
        # Local adapters must be in the image: /app is the repository root there.
        local = Path(spec.source.replace("/app/", "", 1))
        assert (ROOT / local / "adapter_config.json").is_file(), spec.entry


def test_gpu_overlay_runs_one_rank_per_gpu() -> None:
    (container,) = containers(RENDERED["overlays/gpu"])
    env = container_env(container, RENDERED["overlays/gpu"])
    assert env["DEVICE"] == "cuda"
    assert int(env["NUM_SHARD"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["image"].endswith(":cuda")
    assert "/dev/shm" in {m["mountPath"] for m in container["volumeMounts"]}


# ---- probes, shutdown, security ------------------------------------------------------------------


def router_get_paths() -> set[str]:
    app = web.Application()
    setup_routes(app)
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}


@pytest.mark.parametrize("target", TARGETS)
def test_probes_hit_router_routes_on_the_served_port(target: str) -> None:
    paths = router_get_paths()
    assert "/health" in paths
    for container in containers(TARGETS[target]):
        env = container_env(container, TARGETS[target])
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind not in container:
                continue
            probe = container[kind]["httpGet"]
            assert probe["path"] in paths, f"{target}: {kind} path {probe['path']} is not a router route"
            assert ports[probe["port"]] == int(env.get("PORT", default_setting("port")))
            # The router waits HEALTH_TIMEOUT_S for the workers before answering 503.
            assert container[kind]["timeoutSeconds"] > HEALTH_TIMEOUT_S


def test_probe_check_rejects_a_missing_route() -> None:
    assert "/healthz" not in router_get_paths()


@pytest.mark.parametrize("target", TARGETS)
def test_termination_grace_covers_the_drain(target: str) -> None:
    for spec in pod_specs(TARGETS[target]):
        for container in spec["containers"]:
            env = container_env(container, TARGETS[target])
            drain = float(
                env.get("GRACEFUL_TERMINATION_TIMEOUT", default_setting("graceful_termination_timeout"))
            )
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            # The router gets the drain plus KILL_GRACE_S; then the workers stop (their own grace).
            needed = pre_stop + drain + KILL_GRACE_S + WORKER_SHUTDOWN_GRACE_S
            assert spec["terminationGracePeriodSeconds"] >= needed, f"{target}: needs {needed} s"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_non_root_on_a_read_only_root_with_writable_caches(target: str) -> None:
    uid = dockerfile_user()
    for spec in pod_specs(TARGETS[target]):
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["runAsUser"] == uid != 0
        assert spec.get("enableServiceLinks") is False
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            env = container_env(container, TARGETS[target])
            for path in (
                "/tmp",
                env["HUGGINGFACE_HUB_CACHE"],
                env["MULTILORA_CACHE"],
                *dockerfile_env_paths(),
            ):
                assert any(path == m or path.startswith(m + "/") for m in mounts), f"{path} is not writable"


# ---- autoscaling ---------------------------------------------------------------------------------


def test_hpa_scales_on_the_queue_metric_the_adapter_serves_and_the_router_exports() -> None:
    (hpa,) = [r for r in RENDERED["base"] if r["kind"] == "HorizontalPodAutoscaler"]
    (deployment,) = [r for r in RENDERED["base"] if r["kind"] == "Deployment"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "multilora",
    }
    assert deployment["metadata"]["name"] == "multilora" and "replicas" not in deployment["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "tgi_queue_size"

    (configmap,) = load_yaml(ADAPTER_RULES)
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    served = [r for r in rules if r["name"]["as"] == name]
    assert len(served) == 1
    assert re.fullmatch(served[0]["name"]["matches"], name)
    assert served[0]["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.GroupBy>>" in served[0]["metricsQuery"]

    limits = Limits(
        max_input_tokens=8,
        max_total_tokens=16,
        max_batch_prefill_tokens=16,
        max_batch_total_tokens=64,
        max_batch_size=None,
        max_concurrent_requests=4,
        max_stop_sequences=4,
        max_top_n_tokens=5,
        max_best_of=2,
        waiting_served_ratio=0.3,
        max_waiting_tokens=20,
    )
    assert f"# TYPE {name} gauge" in render_metrics(Metrics(limits, "base").registry).splitlines()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in router_get_paths()


def test_pdb_and_hpa_keep_one_replica_through_a_drain() -> None:
    (pdb,) = [r for r in RENDERED["base"] if r["kind"] == "PodDisruptionBudget"]
    (hpa,) = [r for r in RENDERED["base"] if r["kind"] == "HorizontalPodAutoscaler"]
    (deployment,) = [r for r in RENDERED["base"] if r["kind"] == "Deployment"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1


@pytest.mark.parametrize("target", TARGETS)
def test_manifest_cache_paths_are_the_images(target: str) -> None:
    image = dockerfile_env()
    for container in containers(TARGETS[target]):
        env = container_env(container, TARGETS[target])
        for name in ("HUGGINGFACE_HUB_CACHE", "MULTILORA_CACHE", "PORT", "HOSTNAME"):
            assert env.get(name, image[name]) == image[name], f"{target}: {name} differs from the image's"
