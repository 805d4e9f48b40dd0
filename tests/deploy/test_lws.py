"""deploy/k8s/lws/leaderworkerset.yaml: one tensor-parallel group across the pods of a LeaderWorkerSet.

The LeaderWorkerSet is a CRD without a schema in kubernetes-validate: its structure is checked here by hand
(its pod templates are schema-checked in test_manifests.py). Then each pod's environment is expanded the way
Kubernetes and LWS would (LWS_* variables, fieldRefs, the token Secret) and given to the launcher's Settings:
every pod must get valid settings, the pods together must start each rank once, and the addresses the
leader's router dials must be the worker pods' DNS names and the ports their ranks listen on.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from launch import nodes
from launch.settings import Settings
from tests.deploy.deploy_files import (
    LWS,
    LWS_DOCS,
    LWS_FILE,
    LWS_SPEC_KEYS,
    LWS_TEMPLATE_KEYS,
    SETTINGS_ENV,
    container_env,
    doc_section,
)

NAME = LWS["metadata"]["name"]
TEMPLATE = LWS["spec"]["leaderWorkerTemplate"]
SIZE = TEMPLATE["size"]
NAMESPACE = "serving"
TOKEN_SECRET = ("multilora-worker-token", "WORKER_TOKEN")
SECRETS = {TOKEN_SECRET: "9f" * 32}


def container(role: str) -> dict[str, Any]:
    return TEMPLATE[role]["spec"]["containers"][0]


def pod_name(index: int, group: int = 0) -> str:
    """LWS's pod names: the leader is <name>-<group>, worker k is <name>-<group>-<k>."""
    return f"{NAME}-{group}" if index == 0 else f"{NAME}-{group}-{index}"


def pod_env(index: int) -> dict[str, str]:
    """The environment pod `index` of group 0 starts with: LWS's variables first, then the container's,
    with $(VAR) references to earlier ones expanded; optional secrets that do not exist are left out."""
    env = {
        "LWS_LEADER_ADDRESS": f"{pod_name(0)}.{NAME}.{NAMESPACE}",
        "LWS_GROUP_SIZE": str(SIZE),
        "LWS_WORKER_INDEX": str(index),
    }
    fields = {"metadata.name": pod_name(index), "metadata.namespace": NAMESPACE}
    for var in container("leaderTemplate" if index == 0 else "workerTemplate")["env"]:
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            value = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) not in SECRETS:
                assert ref.get("optional"), f"{var['name']}: secret {ref['name']} is required"
                continue
            value = SECRETS[(ref["name"], ref["key"])]
        env[var["name"]] = value
    return env


def pod_settings(index: int) -> Settings:
    env = pod_env(index)
    return Settings(**{k.lower(): v for k, v in env.items() if k in SETTINGS_ENV})


def test_leaderworkerset_structure() -> None:
    assert LWS["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = LWS["spec"]
    assert set(spec) <= LWS_SPEC_KEYS
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
    assert spec.get("startupPolicy", "LeaderCreated") in {"LeaderCreated", "LeaderReady"}
    assert set(TEMPLATE) <= LWS_TEMPLATE_KEYS
    assert isinstance(SIZE, int) and SIZE >= 2, "one group spans several pods"
    # A lost pod breaks the torch.distributed world: the whole group must be recreated.
    assert TEMPLATE["restartPolicy"] == "RecreateGroupOnPodRestart"
    # WORKER_ADDRESSES names pods under one headless service named after the LWS (LWS's Shared policy).
    assert spec["networkConfig"]["subdomainPolicy"] == "Shared"
    assert NAME not in {d["metadata"]["name"] for d in LWS_DOCS if d["kind"] == "Service"}


def test_only_the_leader_is_behind_the_http_service() -> None:
    (service,) = [d for d in LWS_DOCS if d["kind"] == "Service"]
    selector = dict(service["spec"]["selector"])
    assert selector.pop("leaderworkerset.sigs.k8s.io/name") == NAME
    assert selector.items() <= TEMPLATE["leaderTemplate"]["metadata"]["labels"].items()
    assert not selector.items() <= TEMPLATE["workerTemplate"]["metadata"]["labels"].items()
    assert "startupProbe" in container("leaderTemplate")


@pytest.mark.parametrize("index", range(SIZE))
def test_every_pod_gets_valid_settings_for_its_share_of_the_group(index: int) -> None:
    settings = pod_settings(index)  # raises on settings the launcher refuses
    gpus = container("leaderTemplate" if index == 0 else "workerTemplate")["resources"]["limits"][
        "nvidia.com/gpu"
    ]
    assert (settings.num_nodes, settings.node_rank) == (SIZE, index)
    assert settings.num_shard == SIZE * gpus, "NUM_SHARD is the whole group's ranks, one per GPU"
    assert settings.node_layout.local_size == gpus
    assert settings.master_addr == f"{pod_name(0)}.{NAME}.{NAMESPACE}", "the rendezvous is on the leader"
    assert settings.worker_token == SECRETS[TOKEN_SECRET]
    assert settings.device == "cuda"


def test_the_pods_start_every_rank_once() -> None:
    ranks = [r for index in range(SIZE) for r in pod_settings(index).node_layout.ranks]
    assert sorted(ranks) == list(range(pod_settings(0).num_shard))


def test_the_router_dials_the_worker_pods_where_their_ranks_listen() -> None:
    leader = pod_settings(0)
    dialed = nodes.remote_rank_addresses(leader.node_layout, leader.worker_addresses, leader.worker_port_base)
    expected = []
    for index in range(1, SIZE):
        worker = pod_settings(index)
        listen = nodes.listen_addresses(worker.node_layout, worker.hostname, worker.worker_port_base)
        ports = [int(a.rsplit(":", 1)[1]) for a in listen]
        assert worker.hostname == "0.0.0.0", "worker ranks must listen on the pod's network"
        declared = {p["containerPort"] for p in container("workerTemplate")["ports"]}
        assert set(ports) <= declared, "every rank port is declared on the worker container"
        expected += [f"{pod_name(index)}.{NAME}:{port}" for port in ports]
    assert dialed == expected


def test_the_rendezvous_port_is_the_leaders() -> None:
    leader = container("leaderTemplate")
    port = next(p for p in leader["ports"] if p["name"] == "rendezvous")["containerPort"]
    assert all(pod_settings(i).master_port == port for i in range(SIZE))


def test_the_worker_token_comes_from_a_required_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for role in ("leaderTemplate", "workerTemplate"):
        source = container_env(container(role), LWS_DOCS)["WORKER_TOKEN"]
        assert source == {"secretKeyRef": {"name": TOKEN_SECRET[0], "key": TOKEN_SECRET[1]}}, role
    monkeypatch.delitem(SECRETS, TOKEN_SECRET)
    for index in range(SIZE):
        with pytest.raises(AssertionError, match="is required"):
            pod_env(index)


def test_a_group_without_the_token_or_worker_addresses_is_refused() -> None:
    env = {k.lower(): v for k, v in pod_env(0).items() if k in SETTINGS_ENV}
    for dropped in ("worker_token", "worker_addresses"):
        with pytest.raises(ValueError, match=dropped.upper()):
            Settings(**{k: v for k, v in env.items() if k != dropped})


def test_the_file_and_docs_describe_a_working_group() -> None:
    header = LWS_FILE.read_text().split("apiVersion:", 1)[0]
    assert "TEMPLATE" not in header and "NOT RUNNABLE" not in header
    for needed in ("NODE_RANK", "WORKER_ADDRESSES", "WORKER_TOKEN", "kubectl create secret"):
        assert needed in header, needed
    section = doc_section("docs/deploy.md", "Kubernetes")
    for needed in ("NUM_NODES", "NODE_RANK", "WORKER_ADDRESSES", "WORKER_TOKEN", "multilora-worker-token"):
        assert needed in section, needed
    assert "does not run yet" not in section
