"""The nodes of one tensor-parallel group: which ranks this launcher starts, where they serve, and where
node 0's router finds every rank.

NUM_SHARD is the group's world size. Each of the NUM_NODES nodes (pods) runs one launcher, which starts
L = NUM_SHARD / NUM_NODES ranks: node k the global ranks k*L .. k*L+L-1. All of them join one
torch.distributed world whose rendezvous is MASTER_ADDR:MASTER_PORT (node 0).

- Node 0 serves its ranks on owner-only unix sockets and runs the router.
- Node k > 0 runs no router; its local rank i serves gRPC on TCP `HOSTNAME:WORKER_PORT_BASE+i` and
  refuses every call that does not carry WORKER_TOKEN (worker/auth.py).
- The router reaches node k's ranks at the k-th entry of WORKER_ADDRESSES (`host` or `host:port`; the
  port is that node's WORKER_PORT_BASE, by default this node's), rank by rank from that port up.

Nothing here reads the environment or knows `Settings`: each function takes the values it uses.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# A guessable token would open the ranks to anyone who can reach their ports.
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class NodeLayout:
    num_shard: int
    num_nodes: int
    node_rank: int

    @property
    def local_size(self) -> int:
        return self.num_shard // self.num_nodes

    @property
    def ranks(self) -> range:
        """The global ranks this node starts."""
        return range(self.node_rank * self.local_size, (self.node_rank + 1) * self.local_size)

    @property
    def is_leader(self) -> bool:
        return self.node_rank == 0


def check(layout: NodeLayout, worker_addresses: str, worker_port_base: int, worker_token: str) -> list[str]:
    """What is wrong with the node settings, each message naming its settings; empty when they are fine."""
    num_shard, num_nodes, node_rank = layout.num_shard, layout.num_nodes, layout.node_rank
    if node_rank >= num_nodes:
        return [f"NODE_RANK ({node_rank}) must be less than NUM_NODES ({num_nodes})"]
    if num_shard % num_nodes:
        return [
            f"NUM_SHARD ({num_shard}) must be a multiple of NUM_NODES ({num_nodes}): each node starts "
            "NUM_SHARD/NUM_NODES ranks"
        ]
    if num_nodes == 1:
        if worker_addresses.strip():
            return ["WORKER_ADDRESSES is set but NUM_NODES is 1: it lists the other nodes of a group"]
        return []
    problems = []
    if len(worker_token) < MIN_TOKEN_CHARS:
        problems.append(
            f"WORKER_TOKEN must be set, at least {MIN_TOKEN_CHARS} characters, when NUM_NODES > 1: the "
            "ranks of nodes other than 0 serve on TCP and refuse calls without it (e.g. `openssl rand -hex "
            "32`, the same on every node)"
        )
    last_port = worker_port_base + num_shard // num_nodes - 1
    if last_port > 65535:
        problems.append(f"WORKER_PORT_BASE ({worker_port_base}): its last rank's port {last_port} > 65535")
    if node_rank == 0:
        try:
            nodes = parse_worker_addresses(worker_addresses, worker_port_base)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if len(nodes) != num_nodes - 1:
                problems.append(
                    f"WORKER_ADDRESSES lists {len(nodes)} node(s), NUM_NODES ({num_nodes}) needs "
                    f"{num_nodes - 1}: the address of each node 1..NUM_NODES-1, in order"
                )
    return problems


def parse_worker_addresses(text: str, default_port: int) -> list[tuple[str, int]]:
    """(host, first port) of each WORKER_ADDRESSES entry; ValueError names a bad entry."""
    if not text.strip():
        return []
    nodes = []
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        where = f"WORKER_ADDRESSES entry {position} {entry!r}"
        try:
            parts = urlsplit(f"//{entry}")
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not entry or not host or parts.path or parts.username is not None:
            raise ValueError(f"{where}: expected `host` or `host:port`")
        nodes.append((host, default_port if port is None else port))
    return nodes


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def remote_rank_addresses(layout: NodeLayout, worker_addresses: str, worker_port_base: int) -> list[str]:
    """Node 0: `host:port` of every rank of nodes 1..NUM_NODES-1, in rank order. Other nodes: none."""
    if not layout.is_leader:
        return []
    nodes = parse_worker_addresses(worker_addresses, worker_port_base)
    return [_target(host, port + i) for host, port in nodes for i in range(layout.local_size)]


def listen_addresses(layout: NodeLayout, hostname: str, worker_port_base: int) -> list[str]:
    """Nodes other than 0: the TCP address each local rank serves on, in rank order."""
    return [_target(hostname, worker_port_base + i) for i in range(layout.local_size)]


def rank_listening(address: str) -> bool:
    """True when the rank's TCP `address` (`host:port`, as listen_addresses gives) accepts connections,
    which it does once its model is loaded. Not a gRPC call, as for the unix-socket ranks
    (supervision.worker_listening): the launcher must not use gRPC."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
            return True
    except OSError:
        return False
