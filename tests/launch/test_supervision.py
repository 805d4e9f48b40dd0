"""Process supervision with dummy child processes (the real worker and router are exercised in tests/e2e/):
the ordered stop, signals, failures, and the readiness check that must not use gRPC."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from launch.supervision import FORCE_AFTER_S
from router.config import HUNG_RANK_SIGNAL

ROOT = Path(__file__).resolve().parents[2]


def test_worker_listening_without_grpc():
    # gRPC in the launcher process could abort or hang the router it forks later (grpc/grpc#43055).
    code = textwrap.dedent(
        """
        import os, socket, sys, tempfile
        import launcher  # all that the launcher process imports
        from launch.supervision import worker_listening
        path = os.path.join(tempfile.mkdtemp(dir="/tmp"), "w.sock")
        assert not worker_listening(path)
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        assert not worker_listening(path)  # bound, not listening
        server.listen()
        assert worker_listening(path)
        assert "grpc" not in sys.modules, "the launcher imported grpc"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- supervision with dummy children ---------------------------------------------------------------

DUMMY_CHILD = """
import os, signal, sys, time
from pathlib import Path
role, log, ready, behaviour = sys.argv[1:5]
def note(what):
    with open(log, "a") as f:
        f.write(f"{role} {what}\\n")
def on_term(signum, frame):
    note("term")
    if behaviour == "slow_stop":
        time.sleep(1.0)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term if behaviour != "ignore_term" else signal.SIG_IGN)
if behaviour == "loading":  # like a worker loading its model: no handler yet, never ready
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
note("start")
print(f"{role} says hello", flush=True)
if behaviour == "crash_at_start":
    print("boom: cannot load the thing", flush=True)
    sys.exit(3)
if behaviour != "loading":
    Path(ready).write_text(str(os.getpid()))
t0 = time.monotonic()
while True:
    time.sleep(0.05)
    if behaviour == "crash_later" and time.monotonic() - t0 > 1.0:
        print("fatal: lost my mind", flush=True)
        sys.exit(4)
"""

DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from launch import supervision
supervision.KILL_GRACE_S = 1.0
tmp = Path({tmp!r})
def child(role, behaviour):
    ready = str(tmp / f"ready-{{role}}")
    return [sys.executable, str(tmp / "child.py"), role, str(tmp / "log"), ready, behaviour]
behaviours = {behaviours!r}
workers = [child(f"worker{{r}}", behaviours.get(f"worker{{r}}", "ok")) for r in range({n})]
code = supervision.supervise(
    workers,
    child("router", behaviours.get("router", "ok")),
    lambda rank: (tmp / f"ready-worker{{rank}}").exists(),
    graceful_timeout_s={timeout},
    router_stdin=bytes({stdin_bytes}) or None,
)
sys.exit(code)
"""


class Run:
    def __init__(
        self,
        tmp_path: Path,
        behaviours: dict[str, str],
        n: int = 2,
        timeout: float = 2.0,
        stdin_bytes: int = 0,
    ):
        self.tmp = tmp_path
        (tmp_path / "child.py").write_text(DUMMY_CHILD)
        script = DRIVER.format(
            root=str(ROOT),
            tmp=str(tmp_path),
            behaviours=behaviours,
            n=n,
            timeout=timeout,
            stdin_bytes=stdin_bytes,
        )
        (tmp_path / "driver.py").write_text(textwrap.dedent(script))
        self.proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "driver.py")], stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )

    def wait_for(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.tmp / path).exists():
            assert self.proc.poll() is None, f"launcher exited early: {self.proc.stderr.read()}"
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.05)

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        pids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", err)]
        assert pids, err
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"child {pid} is left over (running or zombie)\n{err}"
        return self.proc.returncode, err

    def events(self) -> list[str]:
        path = self.tmp / "log"
        return path.read_text().split("\n")[:-1] if path.exists() else []


def test_sigterm_stops_router_then_workers_exit_0(tmp_path):
    run = Run(tmp_path, {})
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    events = run.events()
    assert set(events[:2]) == {"worker0 start", "worker1 start"}
    assert events[2:4] == ["router start", "router term"]
    assert sorted(events[4:]) == ["worker0 term", "worker1 term"]
    assert "worker-0 | worker0 says hello" in err and "router | router says hello" in err


def test_a_router_that_does_not_read_its_stdin_cannot_block_the_launcher(tmp_path):
    run = Run(tmp_path, {}, stdin_bytes=4 << 20)  # far more than a pipe holds; the dummy never reads
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish(timeout=30)
    assert code == 0, err


def test_a_signal_delivered_twice_at_once_stays_graceful(tmp_path):
    # `make serve` gets the group's SIGTERM and forwards it: the launcher sees two at once.
    run = Run(tmp_path, {"router": "slow_stop"}, n=1)
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGTERM)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    assert "killing everything" not in err


def test_a_later_second_signal_kills_at_once(tmp_path):
    run = Run(tmp_path, {"router": "ignore_term"}, n=1, timeout=60)
    run.wait_for("ready-router")
    start = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    time.sleep(FORCE_AFTER_S + 0.5)
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 1 and "SIGINT again: killing everything now" in err, err
    assert time.monotonic() - start < 30


def test_sigint_works_like_sigterm(tmp_path):
    run = Run(tmp_path, {}, n=1)
    run.wait_for("ready-router")
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 0, err


def test_sigterm_while_a_worker_loads_exits_0(tmp_path):
    run = Run(tmp_path, {"worker0": "loading"}, n=1)
    deadline = time.monotonic() + 30
    while "worker0 start" not in run.events():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 0, err
    assert "router start" not in run.events()


def test_worker_failing_at_startup_stops_everything(tmp_path):
    run = Run(tmp_path, {"worker1": "crash_at_start"})
    code, err = run.finish()
    assert code == 1
    assert "worker-1 (pid" in err and "exited with code 3" in err
    assert "boom: cannot load the thing" in err.split("its last output:")[1]
    assert "router start" not in run.events()
    assert "worker0 term" in run.events()


def test_worker_dying_while_serving_stops_router_and_exits_1(tmp_path):
    run = Run(tmp_path, {"worker0": "crash_later"})
    code, err = run.finish()
    assert code == 1
    assert "exited with code 4" in err and "fatal: lost my mind" in err
    assert {"router term", "worker1 term"} <= set(run.events())


def test_worker_killed_reports_the_signal(tmp_path):
    run = Run(tmp_path, {})
    run.wait_for("ready-router")
    os.kill(int((tmp_path / "ready-worker1").read_text()), signal.SIGKILL)
    code, err = run.finish()
    assert code == 1
    assert "worker-1 (pid" in err and "was killed by SIGKILL" in err


def test_a_hung_rank_reported_by_the_router_stops_everything(tmp_path):
    """The router's HUNG_RANK_SIGNAL: the same stop as for a dead rank; the stopped rank gets killed."""
    run = Run(tmp_path, {}, timeout=1.0)
    run.wait_for("ready-router")
    os.kill(int((tmp_path / "ready-worker1").read_text()), signal.SIGSTOP)
    run.proc.send_signal(HUNG_RANK_SIGNAL)
    code, err = run.finish()
    assert code == 1
    assert "the router reports a hung worker rank" in err and "multilora stopped: a worker rank hung" in err
    assert "worker-1 did not stop within 1 s: killing it" in err
    assert {"router term", "worker0 term"} <= set(run.events())


def test_router_failing_stops_workers(tmp_path):
    run = Run(tmp_path, {"router": "crash_at_start"})
    code, err = run.finish()
    assert code == 1
    assert "router (pid" in err and "exited with code 3" in err
    assert {"worker0 term", "worker1 term"} <= set(run.events())


def test_router_ignoring_sigterm_is_killed_after_the_window(tmp_path):
    run = Run(tmp_path, {"router": "ignore_term"}, n=1, timeout=0.5)
    run.wait_for("ready-router")
    start = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    assert code == 1 and "did not stop within" in err
    assert time.monotonic() - start < 30
    assert "worker0 term" in run.events()


def test_children_do_not_outlive_a_killed_launcher(tmp_path):
    run = Run(tmp_path, {}, n=1)
    run.wait_for("ready-router")
    run.proc.kill()
    run.proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while {"router term", "worker0 term"} - set(run.events()):
        assert time.monotonic() < deadline, run.events()
        time.sleep(0.05)
