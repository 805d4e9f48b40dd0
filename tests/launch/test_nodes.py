"""Multi-node settings (NUM_NODES, NODE_RANK, WORKER_ADDRESSES, WORKER_PORT_BASE, WORKER_TOKEN): validation,
which ranks a node starts and where the router finds them, and the supervision of a node without a router
(dummy children; tests/e2e/test_multinode.py runs a real two-node group)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import nodes
from launch.composition import compose
from launch.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "t" * nodes.MIN_TOKEN_CHARS
GROUP = ["--num-shard", "4", "--num-nodes", "2", "--worker-token", TOKEN]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--num-nodes", "0"], "NUM_NODES (--num-nodes)"),
        (["--node-rank", "-1"], "NODE_RANK (--node-rank)"),
        (["--num-nodes", "2", "--node-rank", "2"], "NODE_RANK (2) must be less than NUM_NODES (2)"),
        (["--num-shard", "3", "--num-nodes", "2"], "NUM_SHARD (3) must be a multiple of NUM_NODES (2)"),
        (["--num-shard", "2", "--num-nodes", "2", "--worker-addresses", "h"], "WORKER_TOKEN must be set"),
        (
            ["--num-shard", "2", "--num-nodes", "2", "--worker-token", "short", "--node-rank", "1"],
            "WORKER_TOKEN",
        ),
        ([*GROUP], "WORKER_ADDRESSES lists 0 node(s), NUM_NODES (2) needs 1"),
        ([*GROUP, "--worker-addresses", "a,b"], "WORKER_ADDRESSES lists 2 node(s)"),
        ([*GROUP, "--worker-addresses", "a:port"], "WORKER_ADDRESSES entry 1 'a:port'"),
        ([*GROUP, "--worker-addresses", "a,"], "WORKER_ADDRESSES entry 2 ''"),
        ([*GROUP, "--worker-addresses", "a/b"], "WORKER_ADDRESSES entry 1 'a/b'"),
        (["--worker-addresses", "a"], "WORKER_ADDRESSES is set but NUM_NODES is 1"),
        ([*GROUP, "--node-rank", "1", "--worker-port-base", "65535"], "WORKER_PORT_BASE (65535)"),
    ],
)
def test_validation_errors_name_the_setting(argv, named):
    with pytest.raises(SettingsError, match=re.escape(named)):
        load_settings(argv)


def test_a_single_node_needs_none_of_them():
    s = load_settings([])
    assert (s.num_nodes, s.node_rank, s.worker_addresses, s.worker_token) == (1, 0, "", "")
    assert list(s.node_layout.ranks) == [0]
    assert nodes.remote_rank_addresses(s.node_layout, s.worker_addresses, s.worker_port_base) == []


def test_the_checks_take_the_values_they_use():
    layout = nodes.NodeLayout(num_shard=4, num_nodes=2, node_rank=0)
    assert nodes.check(layout, "n1", 29600, TOKEN) == []
    [problem] = nodes.check(layout, "", 29600, TOKEN)
    assert problem.startswith("WORKER_ADDRESSES lists 0 node(s), NUM_NODES (2) needs 1")
    assert nodes.remote_rank_addresses(layout, "n1", 29600) == ["n1:29600", "n1:29601"]
    assert nodes.listen_addresses(nodes.NodeLayout(4, 2, 1), "h", 5000) == ["h:5000", "h:5001"]


def test_worker_addresses_forms():
    parse = nodes.parse_worker_addresses
    assert parse("", 29600) == []
    assert parse("a.svc , b:7000,10.0.0.3", 29600) == [("a.svc", 29600), ("b", 7000), ("10.0.0.3", 29600)]
    assert parse("[fd00::1]:7000", 1) == [("fd00::1", 7000)]


def test_node_0_starts_the_first_ranks_and_finds_the_others(tmp_path):
    s = load_settings([*GROUP, "--num-shard", "6", "--num-nodes", "3", "--worker-addresses", "n1,n2:7000"])
    workers, router = compose(s, tmp_path, [], ["/s/0", "/s/1"], "cpu")
    assert [(w.rank, w.world_size) for w in workers] == [(0, 6), (1, 6)]
    assert router.worker_uds == ["/s/0", "/s/1"]
    assert router.worker_tcp == ["n1:29600", "n1:29601", "n2:7000", "n2:7001"]
    assert router.worker_token == TOKEN


def test_node_k_starts_its_ranks_on_tcp(tmp_path):
    s = load_settings([*GROUP, "--node-rank", "1", "--hostname", "10.1.2.3", "--worker-port-base", "5000"])
    workers, router = compose(s, tmp_path, [], ["/s/0", "/s/1"], "cpu")
    assert [(w.rank, w.world_size, w.master_port) for w in workers] == [(2, 4, 29500), (3, 4, 29500)]
    listen = nodes.listen_addresses(s.node_layout, s.hostname, s.worker_port_base)
    assert listen == ["10.1.2.3:5000", "10.1.2.3:5001"]
    assert router.worker_tcp == []


def test_rank_listening_is_a_plain_tcp_connect():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert nodes.rank_listening(address)
    assert not nodes.rank_listening(address)


# ---- supervision of a node without a router ------------------------------------------------------

CHILD = """
import os, signal, sys, time
from pathlib import Path
name, tmp, behaviour = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
(tmp / f"stdin-{name}").write_text(sys.stdin.read())
(tmp / f"env-{name}").write_text("WORKER_TOKEN" if "WORKER_TOKEN" in os.environ else "")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
(tmp / f"ready-{name}").write_text("")
t0 = time.monotonic()
while True:
    time.sleep(0.05)
    if behaviour == "crash" and time.monotonic() - t0 > 1.0:
        sys.exit(3)
"""

DRIVER = """
import logging, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from launch.supervision import supervise
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
tmp = Path({tmp!r})
ranks = [2, 3]
behaviours = {behaviours!r}
child = [sys.executable, str(tmp / "child.py")]
code = supervise(
    [[*child, f"worker{{r}}", str(tmp), behaviours.get(r, "ok")] for r in ranks],
    None,
    lambda index: (tmp / f"ready-worker{{ranks[index]}}").exists(),
    graceful_timeout_s=2.0,
    worker_ranks=ranks,
    worker_stdin=b"secret-token\\n",
)
sys.exit(code)
"""


def start_node(tmp_path: Path, behaviours: dict[int, str]) -> subprocess.Popen:
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "driver.py").write_text(
        textwrap.dedent(DRIVER.format(root=str(ROOT), tmp=str(tmp_path), behaviours=behaviours))
    )
    env = {"PATH": "/usr/bin:/bin", "WORKER_TOKEN": "from-the-environment"}
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_node_without_router_stops_its_ranks_on_sigterm_and_exits_0(tmp_path):
    proc = start_node(tmp_path, {})
    wait_for(tmp_path / "ready-worker3", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "started worker-2" in err and "started worker-3" in err and "router" not in err
    for rank in (2, 3):
        assert (tmp_path / f"stdin-worker{rank}").read_text() == "secret-token\n"
        assert (tmp_path / f"env-worker{rank}").read_text() == "", "WORKER_TOKEN leaked into a child's env"
    assert not re.search(r"worker-\d+ .*killed", err)


def test_a_node_without_router_exits_1_when_a_rank_dies(tmp_path):
    proc = start_node(tmp_path, {3: "crash"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "worker-3" in err and "exited with code 3" in err
