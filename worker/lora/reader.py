"""Where one rank reads adapters: reading the files, validating, converting and sharding, off the steps.

A read takes tens of milliseconds of CPU and a few thousand small torch ops. On a thread of the worker
it stalls the steps even though it changes nothing they read: both threads take turns at the GIL on
every op, so each op of a step can wait for the loader's Python in between, and on a machine with few
cores the loader takes a core from the steps' OpenMP team. A step of a batch-1 decode then took ~6x as
long while loads ran (bench_adapters, part 3). So the reading runs in a child process (`ReaderProcess`)
at idle priority (SCHED_IDLE: it only gets a core the steps leave idle; ADAPTER_LOAD_PRIORITY can give
it a nice value instead), which hands back the prepared adapter in shared memory: a few blocks
(`worker/lora/packed.py`), so the worker only maps them.

The child is forked at startup before any thread or OpenMP team exists (forking later is unsafe), so
it shares the imported modules' pages with the worker and needs no interpreter of its own. If it could
not be forked, or has died, adapters are read on the worker's loader thread instead, and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors)

from worker.errors import RequestError
from worker.lora.adapter import AdapterError, ModuleShape, load_peft_adapter
from worker.lora.sites import LoraSite
from worker.lora.slots import PreparedAdapter, prepare_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadSpec:
    """What reading an adapter for one rank needs to know of the model (plain data: it is pickled)."""

    num_layers: int
    module_shapes: dict[str, ModuleShape]
    sites: list[LoraSite]
    dtype: torch.dtype  # the pool's
    max_lora_rank: int
    pin: bool  # page-locked host memory, for a GPU pool


def read_adapter(name: str, path: Path, spec: ReadSpec) -> PreparedAdapter:
    """Read, validate, convert and shard the PEFT adapter at `path` (AdapterError or RequestError,
    naming it, when it is refused)."""
    adapter = load_peft_adapter(name, path, spec.num_layers, spec.module_shapes)
    return prepare_adapter(adapter, spec.sites, spec.dtype, spec.max_lora_rank, pin=False)


class ReaderProcess:
    """A forked child that runs `read_adapter` for the worker, one adapter at a time."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection):
        self._process = process
        self._conn = conn
        self._lock = threading.Lock()  # one read in flight: requests and replies pair up in order

    @classmethod
    def fork(cls, nice: int | None = None) -> ReaderProcess | None:
        """Start the child now, at SCHED_IDLE or at `nice`; None (reads then run on a thread) if threads
        already run here."""
        if threading.active_count() > 1:
            log.warning("threads already running: adapters will be read on a thread of the worker")
            return None
        ctx = multiprocessing.get_context("fork")
        mine, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(theirs, mine, nice), name="adapter-reader", daemon=True)
        process.start()
        theirs.close()
        return cls(process, mine)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def read(self, name: str, path: Path, spec: ReadSpec) -> PreparedAdapter:
        """`read_adapter` in the child (blocks). A refusal is raised as the child raised it; anything
        else, or a child that died, is a RuntimeError."""
        with self._lock:
            try:
                self._conn.send((name, str(path), spec))
                status, value = self._conn.recv()
            except (EOFError, OSError) as err:
                self._process.join(timeout=1.0)
                code = self._process.exitcode
                raise RuntimeError(f"the adapter reader process exited (code {code})") from err
        if status == "ok":
            return value
        if status == "refused":
            raise value
        raise RuntimeError(f"in the adapter reader process: {value}")

    def close(self) -> None:
        self._conn.close()  # the child sees EOF and exits
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _serve(conn: Connection, parents_end: Connection, nice: int | None) -> None:
    """The child's loop: read what the worker asks for until the worker closes its end (or dies)."""
    parents_end.close()  # else the worker's death would not close the pipe
    _lower_priority(nice)
    torch.set_num_threads(1)  # one core at most, and no OpenMP team (none was started before the fork)
    while True:
        try:
            name, path, spec = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        prepared = None
        try:
            prepared = read_adapter(name, Path(path), spec)
            for block in prepared.packed.blocks.values():
                block.share_memory_()  # the worker maps these pages; nothing is copied through the pipe
            reply = ("ok", prepared)
        except (AdapterError, RequestError) as err:
            reply = ("refused", err)
        except Exception as err:
            reply = ("failed", f"{type(err).__name__}: {err}")
        conn.send(reply)
        del reply, prepared
        _trim_heap()


def _lower_priority(nice: int | None) -> None:
    """SCHED_IDLE (None): run only on cores the worker's threads leave idle (nice 19 where refused).
    A nice value instead: a share of a busy core, as CFS weighs it against the steps' threads."""
    if nice is None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError):
            nice = 19
    with contextlib.suppress(OSError):
        os.nice(nice - os.nice(0))


def _trim_heap() -> None:
    """Give the freed heap of a read back to the system, so the child holds little between reads."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def loader_thread(rank: int) -> ThreadPoolExecutor:
    """The worker thread that waits on the reader process, or reads itself without one.

    Its torch ops run single-threaded, so that it never starts an OpenMP team of its own to spin on the
    cores the steps need. `torch.set_num_threads` sets the calling thread's OpenMP team size, and also
    the process default that threads starting torch later begin with: the default is put back at once.
    """
    default = torch.get_num_threads()

    def single_threaded() -> None:
        torch.get_num_threads()  # this thread's lazy init first, else it would later reset the size
        torch.set_num_threads(1)

    loader = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=f"rank{rank}-loader", initializer=single_threaded
    )
    loader.submit(lambda: None).result()  # runs the initializer now
    torch.set_num_threads(default)
    return loader


class AdapterReader:
    """A rank's reads: in its `ReaderProcess` while that lives, else on its loader thread."""

    def __init__(self, rank: int, process: ReaderProcess | None = None):
        self.rank = rank
        self._process = process
        self._thread = loader_thread(rank)

    @property
    def in_process(self) -> bool:
        return self._process is not None and self._process.alive

    async def read(self, name: str, path: Path, spec: ReadSpec) -> PreparedAdapter:
        """The prepared adapter, pinned if `spec.pin`; the steps go on meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._read, name, path, spec)

    def _read(self, name: str, path: Path, spec: ReadSpec) -> PreparedAdapter:
        if self._process is not None and not self._process.alive:
            log.error("the adapter reader process is gone: reading adapters on a worker thread from now on")
            self._process = None
        if self._process is not None:
            prepared = self._process.read(name, path, spec)
        else:
            prepared = read_adapter(name, path, spec)
        if spec.pin:
            prepared = PreparedAdapter(prepared.facts, prepared.packed.pinned())
        return prepared

    async def close(self) -> None:
        """Finish the read in progress, drop the queued ones, stop the thread and the process."""
        await asyncio.to_thread(self._thread.shutdown, wait=True, cancel_futures=True)
        if self._process is not None:
            await asyncio.to_thread(self._process.close)
