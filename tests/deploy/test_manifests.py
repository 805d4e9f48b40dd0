"""deploy/: the Kubernetes manifests and the Dockerfile, checked without a cluster, an engine or a network.

- Every resource (the kustomize base and GPU overlay rendered, the adapter rules, the LeaderWorkerSet's
  pod templates and Service) validates strictly against the Kubernetes API schemas that
  kubernetes-validate ships, for the oldest and newest Kubernetes the manifests are meant for. The
  LeaderWorkerSet itself is a CRD without a schema there: its structure is checked here by hand.
- Every environment variable a manifest or the Dockerfile sets is a launcher setting or a listed
  pass-through; probes hit routes the router serves; grace periods cover the launcher's drain.
- The Dockerfile installs with the README's command (`make install`) and runs as a non-root user.

Overlays are rendered by a small strategic merge covering what the overlays here use; when kubectl is
installed, a test checks that it gives what `kubectl kustomize` gives.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
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

import launcher
from router.limits import Limits
from router.metrics import Metrics
from router.metrics import render as render_metrics
from router.routes import HEALTH_TIMEOUT_S, setup_routes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
KUSTOMIZE_DIRS = [K8S / "base", K8S / "overlays" / "gpu"]
LWS_FILE = K8S / "lws" / "leaderworkerset.yaml"
ADAPTER_RULES = K8S / "monitoring" / "prometheus-adapter-rules.yaml"
# The oldest Kubernetes the manifests target (preStop `sleep`, PDB unhealthyPodEvictionPolicy: 1.30)
# and the newest whose schemas the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

SETTINGS_ENV = {launcher.env_name(name) for name in launcher.Settings.model_fields}
# Variables read by the libraries in the launcher's children, not by the launcher (children inherit the
# launcher's environment).
PASS_THROUGH_ENV = {
    "HF_TOKEN": "huggingface_hub: token for gated or private Hub repos",
}
# Image-level variables of the Dockerfile, besides the settings and the pass-throughs.
DOCKERFILE_ENV = {
    "HOME": "the runtime user's home, on the data volume (libraries cache under it)",
    "HF_HOME": "huggingface_hub's home (token, xet cache), on the data volume",
    "CUPY_CACHE_DIR": "cupy's compiled-kernel cache, on the data volume",
    "PYTHONUNBUFFERED": "log lines reach `kubectl logs` at once",
    "PIP_NO_CACHE_DIR": "build only",
    "PIP_DISABLE_PIP_VERSION_CHECK": "build only",
    "TORCH_SPEC": "build only: the Makefile's variable, per variant",
    "TORCH_INDEX": "build only: where the CPU build of torch comes from",
    "EXTRAS": "build only: the project extra of the variant (gpu: cupy)",
}
# Set only by the LeaderWorkerSet template: settings the launcher does not have yet (see that file).
PENDING_LWS_ENV = {"NODE_RANK", "NUM_NODES"}
LWS_SPEC_KEYS = {"replicas", "startupPolicy", "leaderWorkerTemplate", "rolloutStrategy", "networkConfig"}
LWS_TEMPLATE_KEYS = {"size", "restartPolicy", "leaderTemplate", "workerTemplate", "subGroupPolicy"}
# The worker's own stop window after SIGTERM (worker/__main__.py; read from the source: no torch import).
WORKER_SHUTDOWN_GRACE_S = next(
    node.value.value
    for node in ast.parse((ROOT / "worker" / "__main__.py").read_text()).body
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHUTDOWN_GRACE_S"
)


# ---- rendering -----------------------------------------------------------------------------------

# Strategic-merge keys of the lists the overlays patch (the Kubernetes API's patchMergeKey); other lists
# are replaced, as for `tolerations`.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            merged[name] = strategic_merge(base[name], value, name) if name in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        by_key = {item[field]: item for item in patch}
        kept = [
            strategic_merge(item, by_key.pop(item[field]), None) if item[field] in by_key else item
            for item in base
        ]
        return [item for item in patch if item[field] in by_key] + kept
    return copy.deepcopy(patch)


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """The resources of a kustomization, for the fields used here: resources, images, patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unknown, f"{directory}: kustomize_build() does not implement {sorted(unknown)}"
    resources: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        resources += kustomize_build(path) if path.is_dir() else load_yaml(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only strategic-merge patch files are rendered: {patch_entry}"
        for patch in load_yaml(directory / patch_entry["path"]):
            index = next(
                i
                for i, r in enumerate(resources)
                if (r["kind"], r["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
            )
            resources[index] = strategic_merge(resources[index], patch)
    for image in kustomization.get("images", []):
        for container in containers(resources):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                name, tag = image.get("newName", name), image.get("newTag", tag)
                container["image"] = f"{name}:{tag}" if tag else name
    return resources


def pod_specs(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for resource in resources:
        if resource["kind"] == "Deployment":
            specs.append(resource["spec"]["template"]["spec"])
        elif resource["kind"] == "LeaderWorkerSet":
            template = resource["spec"]["leaderWorkerTemplate"]
            specs += [template[t]["spec"] for t in ("leaderTemplate", "workerTemplate") if t in template]
    return specs


def containers(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for spec in pod_specs(resources) for c in spec["containers"]]


def default_setting(name: str) -> Any:
    return launcher.Settings.model_fields[name].default


def container_env(container: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Name -> value (or valueFrom) of every variable the container gets, ConfigMaps included."""
    configmaps = {r["metadata"]["name"]: r["data"] for r in resources if r["kind"] == "ConfigMap"}
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


RENDERED = {d.relative_to(K8S).as_posix(): kustomize_build(d) for d in KUSTOMIZE_DIRS}
LWS_DOCS = load_yaml(LWS_FILE)
(LWS,) = [d for d in LWS_DOCS if d["kind"] == "LeaderWorkerSet"]
# Each target: what one `kubectl apply` creates.
TARGETS = {**RENDERED, "lws": LWS_DOCS}


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


# ---- the LeaderWorkerSet (a CRD: structure checked here) -------------------------------------------


def test_leaderworkerset_structure() -> None:
    assert LWS["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = LWS["spec"]
    assert set(spec) <= LWS_SPEC_KEYS
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
    assert spec.get("startupPolicy", "LeaderCreated") in {"LeaderCreated", "LeaderReady"}
    template = spec["leaderWorkerTemplate"]
    assert set(template) <= LWS_TEMPLATE_KEYS
    assert isinstance(template["size"], int) and template["size"] >= 2, "one group spans several pods"
    # A lost pod breaks the torch.distributed world: the whole group must be recreated.
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    for container in (leader, worker):
        env = container_env(container, LWS_DOCS)
        assert env["MASTER_ADDR"] == "$(LWS_LEADER_ADDRESS)", "the rendezvous is on the leader"
        assert env["NUM_NODES"] == "$(LWS_GROUP_SIZE)"
        index_label = "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"
        assert env["NODE_RANK"] == {"fieldRef": {"fieldPath": index_label}}
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(env["NUM_SHARD"]) == template["size"] * gpus, "NUM_SHARD is the whole group's ranks"
    assert "rendezvous" in {p["name"] for p in leader["ports"]}
    port = next(p for p in leader["ports"] if p["name"] == "rendezvous")["containerPort"]
    assert int(container_env(leader, LWS_DOCS)["MASTER_PORT"]) == port
    # Only the leader runs the router: the Service selects it alone.
    (service,) = [d for d in LWS_DOCS if d["kind"] == "Service"]
    leader_labels = template["leaderTemplate"]["metadata"]["labels"]
    selector = dict(service["spec"]["selector"])
    assert selector.pop("leaderworkerset.sigs.k8s.io/name") == LWS["metadata"]["name"]
    assert selector.items() <= leader_labels.items()
    assert not selector.items() <= template["workerTemplate"]["metadata"]["labels"].items()


def test_leaderworkerset_is_marked_a_template_until_the_launcher_supports_it() -> None:
    """The LWS file sets NODE_RANK/NUM_NODES, which the launcher does not read yet: once it does, drop
    the file's TEMPLATE header and the README's caveat, and move them out of PENDING_LWS_ENV."""
    assert not PENDING_LWS_ENV & SETTINGS_ENV, "the launcher now has these settings: update the LWS template"
    assert LWS_FILE.read_text().startswith("# TEMPLATE, NOT RUNNABLE")
    assert "template" in readme_section("Deploying").lower()


# ---- environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_env_vars_are_launcher_settings_or_pass_through(target: str) -> None:
    allowed = SETTINGS_ENV | set(PASS_THROUGH_ENV) | (PENDING_LWS_ENV if target == "lws" else set())
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
        launcher.Settings(**literal)  # raises on a value the launcher would reject


def test_env_check_rejects_an_unknown_variable() -> None:
    deployment = next(r for r in RENDERED["base"] if r["kind"] == "Deployment")
    container = copy.deepcopy(deployment["spec"]["template"]["spec"]["containers"][0])
    container["env"].append({"name": "NUM_SHARDS", "value": "2"})
    assert "NUM_SHARDS" in set(container_env(container, RENDERED["base"])) - SETTINGS_ENV


def test_configmap_holds_the_served_model_and_adapters() -> None:
    (configmap,) = [r for r in RENDERED["base"] if r["kind"] == "ConfigMap"]
    assert {"MODEL_ID", "NUM_SHARD", "LORA_ADAPTERS"} <= set(configmap["data"])
    for spec in launcher.parse_lora_adapters(configmap["data"]["LORA_ADAPTERS"]):
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
            needed = pre_stop + drain + launcher.KILL_GRACE_S + WORKER_SHUTDOWN_GRACE_S
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


# ---- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in dockerfile_instructions():
        if op == "ENV":
            env.update(dict(re.findall(r'(\w+)=("[^"]*"|\S*)', args)))
    return {k: v.strip('"') for k, v in env.items()}


def dockerfile_env_paths() -> list[str]:
    return [v for k, v in dockerfile_env().items() if k in {"HOME", "HF_HOME", "CUPY_CACHE_DIR"}]


def dockerfile_user() -> int:
    users = [args for op, args in final_stage() if op == "USER"]
    assert users, "the image must set USER"
    uid = users[-1].split(":")[0]
    # Kubernetes' runAsNonRoot can verify a numeric user only.
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, got {uid!r}"
    return int(uid)


def test_dockerfile_installs_with_the_readme_command() -> None:
    runs = [args for op, args in final_stage() if op == "RUN"]
    assert any(re.match(r"make install\b", args) for args in runs), "the image must run `make install`"
    # The README's `make serve` and `make test` install through the same target.
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "test"):
        assert re.search(rf"^{target}: install\b", makefile, re.M)
        assert f"make {target}" in (ROOT / "README.md").read_text()
    assert "make install" in readme_section("Deploying")


def test_dockerfile_runs_the_launcher_as_non_root_on_port_3000() -> None:
    stage = final_stage()
    assert dockerfile_user() != 0
    entrypoint = [args for op, args in stage if op == "ENTRYPOINT"][-1]
    assert json.loads(entrypoint) == ["/app/.venv/bin/python", "/app/launcher.py"]
    assert "3000" in [args for op, args in stage if op == "EXPOSE"]
    env = dockerfile_env()
    assert env["PORT"] == "3000" and env["HOSTNAME"] == "0.0.0.0"
    volumes = json.loads([args for op, args in stage if op == "VOLUME"][-1])
    for name in ("HUGGINGFACE_HUB_CACHE", "MULTILORA_CACHE", *("HOME", "HF_HOME", "CUPY_CACHE_DIR")):
        assert any(env[name].startswith(v) for v in volumes), f"{name} is not on a volume"


def test_dockerfile_variants_choose_base_and_torch() -> None:
    instructions = dockerfile_instructions()
    assert ("ARG", "VARIANT=cpu") in instructions
    stages = {args.split(" AS ")[1] for op, args in instructions if op == "FROM" and " AS " in args}
    assert stages == {"base-cpu", "base-cuda"}
    assert ("FROM", "base-${VARIANT}") in instructions
    assert "TORCH_SPEC=torch==2.13.0+cpu" in DOCKERFILE.read_text()  # the Makefile's CPU pin
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_manifest_cache_paths_are_the_images(target: str) -> None:
    image = dockerfile_env()
    for container in containers(TARGETS[target]):
        env = container_env(container, TARGETS[target])
        for name in ("HUGGINGFACE_HUB_CACHE", "MULTILORA_CACHE", "PORT", "HOSTNAME"):
            assert env.get(name, image[name]) == image[name], f"{target}: {name} differs from the image's"


def test_dockerfile_env_vars_are_known() -> None:
    unknown = set(dockerfile_env()) - SETTINGS_ENV - set(PASS_THROUGH_ENV) - set(DOCKERFILE_ENV)
    assert not unknown, f"unexplained image variables: {sorted(unknown)}"


def test_dockerignore_keeps_what_make_install_needs() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
            for pat in patterns
            for p in prefixes
        )

    for needed in (
        "Makefile",
        "pyproject.toml",
        "README.md",
        "launcher.py",
        "router/app.py",
        "worker/__main__.py",
        "proto/generate.proto",
        "proto/generate_stubs.py",
        "demo_adapters/pirate/adapter_config.json",
        "csrc",
    ):
        assert (ROOT / needed).exists(), needed
        assert not ignored(needed), f".dockerignore drops {needed}"
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "router/__pycache__/app.cpython-311.pyc",
        "proto/generate_pb2.py",
    ):
        assert ignored(dropped), f".dockerignore keeps {dropped}"


# ---- README --------------------------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_readme_documents_the_deployment() -> None:
    section = readme_section("Deploying")
    for needed in (
        "docker build -f deploy/Dockerfile",
        "VARIANT=cuda",
        "deploy/k8s/base",
        "deploy/k8s/overlays/gpu",
        "tgi_queue_size",
        "prometheus-adapter-rules.yaml",
        "/health",
        "LeaderWorkerSet",
        "KV_CACHE_MEMORY",
        "LORA_ADAPTERS",
    ):
        assert needed in section, needed
