"""Process supervision: children in their own process groups with their output forwarded, shutdown
signals, readiness, and the ordered stop (the router's graceful window first, then the workers; after a
death, everything briefly). A rank that hangs instead of dying is found by the router (a step past its
deadline), which reports it with HUNG_RANK_SIGNAL: it is then stopped as a dead one would be. `supervise`
returns the launcher's exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from router.config import HUNG_RANK_SIGNAL

logger = logging.getLogger("launcher")

# The repository root: children run `python -m worker` and `python -m router` from there.
ROOT = Path(__file__).resolve().parents[1]
# Extra time given to a child past its own graceful window before it is killed.
KILL_GRACE_S = 10.0
# After a child died the others cannot serve: they get this long to stop before being killed.
FAILURE_STOP_TIMEOUT_S = 10.0
POLL_S = 0.1
# A shutdown signal repeated at least this long after the first one kills the children at once.
FORCE_AFTER_S = 1.0
# Settings the children must not inherit from the launcher's environment (they get them in their config).
SECRET_ENV = ("API_KEY", "API_KEYS", "WORKER_TOKEN")

_output_lock = threading.Lock()


_libc: Any = None


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the child gets SIGTERM when the launcher dies, even by SIGKILL, so no rank outlives it.
    # libc is loaded in the parent: nothing here may take a lock another thread could have held at fork.
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A child process in its own process group, its output forwarded line by line with a prefix."""

    def __init__(self, name: str, argv: list[str], stdin: bytes | None = None, tail_lines: int = 40) -> None:
        self.name = name
        self.tail: deque[str] = deque(maxlen=tail_lines)
        global _libc
        if _libc is None and sys.platform == "linux":
            _libc = ctypes.CDLL(None)
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if k not in SECRET_ENV}, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's Ctrl-C reaches the launcher only; it orders the shutdown
            preexec_fn=_child_setup,
        )
        self.pid = self.popen.pid
        if stdin is not None:
            # On a thread: a child that does not read would otherwise block the launcher (and its signal
            # handling) in write() once the data outgrows the pipe's buffer.
            threading.Thread(target=self._feed, args=(stdin,), name=f"stdin-{name}", daemon=True).start()
        self._reader = threading.Thread(target=self._forward, name=f"output-{name}", daemon=True)
        self._reader.start()
        logger.info("started %s (pid %d)", name, self.pid)

    def _feed(self, data: bytes) -> None:
        """Write `data` to the child's stdin and close it (a child that died early reports itself)."""
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.write(data)
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.close()

    def _forward(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            with _output_lock:
                sys.stderr.write(f"{self.name} | {line}\n")
                sys.stderr.flush()
        self.popen.stdout.close()

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def reap(self) -> int:
        """Wait for the exited process, kill stragglers of its group, finish forwarding its output."""
        code = self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._reader.join(timeout=2.0)
        return code

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is None:
            return f"{self.name} (pid {self.pid}) is running"
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"{self.name} (pid {self.pid}) {how}"

    def failure_report(self) -> str:
        tail = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        return f"{self.describe_exit()}; its last output:\n{tail}"


class ShutdownRequested(Exception):
    pass


class RankHung(Exception):
    """The router reported a worker rank hung (it names the rank in its log)."""


class Supervisor:
    """Starts children, watches them and the shutdown signals, and stops them in order."""

    def __init__(self, graceful_timeout_s: float) -> None:
        self.graceful_timeout_s = graceful_timeout_s
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.force = threading.Event()
        self.rank_hung = threading.Event()
        self._first_signal_at: float | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        # A repeat within FORCE_AFTER_S is the same request delivered twice (GNU make forwards SIGTERM to
        # the launcher that also got it as a group member); a later one (a second Ctrl-C) forces.
        # State changes come before logging: a handler can run nested inside another one.
        now, first = time.monotonic(), self._first_signal_at
        if first is None:
            self._first_signal_at = now
            self.stop_requested.set()
            logger.info("received %s: shutting down", signal.Signals(signum).name)
        elif now - first >= FORCE_AFTER_S and not self.force.is_set():
            self.force.set()
            logger.warning("%s again: killing everything now", signal.Signals(signum).name)

    def on_rank_hung(self, _signum: int, _frame: object) -> None:
        self.rank_hung.set()

    def start(self, name: str, argv: list[str], stdin: bytes | None = None) -> Child:
        child = Child(name, argv, stdin)
        self.children.append(child)
        return child

    def first_dead(self) -> Child | None:
        return next((c for c in self.children if c.poll() is not None), None)

    def wait_until(self, ready: Callable[[], bool], what: str, log_every_s: float = 10.0) -> Child | None:
        """Block until `ready()`; return a child that died meanwhile; raise ShutdownRequested, RankHung."""
        last_log = time.monotonic()
        while True:
            if self.stop_requested.is_set():
                raise ShutdownRequested
            if self.rank_hung.is_set():
                raise RankHung
            dead = self.first_dead()
            if dead is not None:
                return dead
            if ready():
                return None
            if time.monotonic() - last_log >= log_every_s:
                logger.info("waiting for %s to be ready...", what)
                last_log = time.monotonic()
            time.sleep(POLL_S)

    def stop(self, children: list[Child], timeout_s: float) -> bool:
        """SIGTERM `children` together, SIGKILL those still running after `timeout_s`; True if all clean."""
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(c.poll() is None for c in children) and time.monotonic() < deadline:
            if self.force.is_set():
                break
            time.sleep(POLL_S)
        clean = True
        for child in children:
            if child.poll() is None:
                logger.warning("%s did not stop within %.0f s: killing it", child.name, timeout_s)
                child.signal(signal.SIGKILL)
            # Dying of our SIGTERM is a clean stop too (a worker still loading has no handler yet).
            if child.reap() not in (0, -signal.SIGTERM):
                logger.warning("%s", child.describe_exit())
                clean = False
        return clean

    def stop_all(self, *, failed: bool) -> bool:
        """Stop the router (graceful window) then the workers; after a failure, everything briefly."""
        routers = [c for c in self.children if c.name == "router"]
        workers = [c for c in self.children if c.name != "router"]
        if failed:
            self.stop(routers + workers, min(self.graceful_timeout_s, FAILURE_STOP_TIMEOUT_S))
            return False
        clean = self.stop(routers, self.graceful_timeout_s + KILL_GRACE_S)
        return self.stop(workers, self.graceful_timeout_s + KILL_GRACE_S) and clean


def worker_listening(uds_path: str) -> bool:
    """True when the worker's gRPC server accepts connections on `uds_path`, which it binds once its model
    is loaded (the router then waits for every rank's Health RPC itself).

    Deliberately not a gRPC call: a process that has used gRPC can abort or deadlock the children it forks
    afterwards (grpc/grpc#43055: gRPC's at-fork handlers restart its poller in the child, whose fds
    subprocess then closes before exec), and the launcher forks the router after these checks.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(uds_path)
        except OSError:
            return False
    return True


def supervise(
    worker_argvs: list[list[str]],
    router_argv: list[str] | None,
    worker_ready: Callable[[int], bool],
    graceful_timeout_s: float,
    router_stdin: bytes | None = None,
    worker_ranks: Sequence[int] | None = None,
    worker_stdin: bytes | None = None,
) -> int:
    """Run the workers (global ranks `worker_ranks`, default 0..; `worker_stdin` on their stdin) until
    ready, then the router (`router_stdin` on its stdin; None: none, on a node other than 0), until a
    signal or a death; return the exit code."""
    sup = Supervisor(graceful_timeout_s)
    previous = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[HUNG_RANK_SIGNAL] = signal.signal(HUNG_RANK_SIGNAL, sup.on_rank_hung)
    ranks = list(range(len(worker_argvs)) if worker_ranks is None else worker_ranks)
    try:
        return _run(
            sup,
            list(zip(ranks, worker_argvs, strict=True)),
            worker_stdin,
            (router_argv, router_stdin),
            worker_ready,
        )
    finally:
        for child in sup.children:  # normally all reaped already; this covers unexpected errors
            if child.poll() is None:
                child.signal(signal.SIGKILL)
            child.reap()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(
    sup: Supervisor,
    workers: list[tuple[int, list[str]]],
    worker_stdin: bytes | None,
    router_command: tuple[list[str] | None, bytes | None],
    worker_ready: Callable[[int], bool],
) -> int:
    try:
        for rank, argv in workers:
            sup.start(f"worker-{rank}", argv, worker_stdin)
        for index, (rank, _) in enumerate(workers):
            dead = sup.wait_until(lambda i=index: worker_ready(i), f"worker-{rank}")
            if dead is not None:
                return _fail(sup, dead)
            logger.info("worker-%d is ready", rank)
        if router_command[0] is None:  # a node other than 0: its ranks serve node 0's router
            dead = sup.wait_until(lambda: False, "workers", log_every_s=math.inf)
            assert dead is not None
            return _fail(sup, dead)
        router = sup.start("router", router_command[0], router_command[1])
        dead = sup.wait_until(lambda: False, "router", log_every_s=math.inf)
    except ShutdownRequested:
        return 0 if sup.stop_all(failed=False) else 1
    except RankHung:
        return _fail_hung(sup)
    assert dead is not None
    if dead is router and dead.poll() == 0:
        logger.info("the router exited; stopping the workers")
        router.reap()
        return 0 if sup.stop_all(failed=False) else 1
    return _fail(sup, dead)


def _fail(sup: Supervisor, dead: Child) -> int:
    dead.reap()
    sup.children.remove(dead)  # reaped and reported here; the others are stopped below
    logger.error("%s", dead.failure_report())
    logger.error("stopping the other processes")
    sup.stop_all(failed=True)
    logger.error("multilora stopped: %s", dead.describe_exit())
    return 1


def _fail_hung(sup: Supervisor) -> int:
    """As `_fail`, for a rank that hangs: it will not exit by itself, so all are stopped (and killed)."""
    logger.error("the router reports a hung worker rank (a step passed its deadline; its log names the rank)")
    logger.error("stopping every process")
    sup.stop_all(failed=True)
    logger.error("multilora stopped: a worker rank hung")
    return 1
