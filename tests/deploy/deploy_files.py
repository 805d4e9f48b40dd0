"""Shared by the tests of deploy/: the files, kustomize rendering, pod specs and environments, the
Dockerfile's instructions, sections of the docs (docs/deploy.md).

Overlays are rendered by a small strategic merge covering what the overlays here use;
test_manifests.py checks that it gives what `kubectl kustomize` gives where kubectl is installed.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from launch.settings import Settings, env_name

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

SETTINGS_ENV = {env_name(name) for name in Settings.model_fields}
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
    "INSTALL_EXTRAS": "build only: the Makefile's variable, per variant (gpu: cupy)",
}
# Set only in the LeaderWorkerSet, to be expanded in other variables' values (the launcher ignores them).
LWS_EXPANSION_ENV = {"POD_NAME": "the pod's name, from which WORKER_ADDRESSES names the worker pods"}
LWS_SPEC_KEYS = {"replicas", "startupPolicy", "leaderWorkerTemplate", "rolloutStrategy", "networkConfig"}
LWS_TEMPLATE_KEYS = {"size", "restartPolicy", "leaderTemplate", "workerTemplate", "subGroupPolicy"}
# The worker's own stop window after SIGTERM (worker/__main__.py; read from the source: no torch import).
WORKER_SHUTDOWN_GRACE_S = next(
    node.value.value
    for node in ast.parse((ROOT / "worker" / "__main__.py").read_text()).body
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHUTDOWN_GRACE_S"
)


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
    return Settings.model_fields[name].default


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


def doc_section(path: str, title: str) -> str:
    """The text under the `## {title}` heading of a Markdown file (path relative to the repository root),
    up to the next `## ` heading."""
    text = (ROOT / path).read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path} has no '## {title}' section"
    return match.group(1)
