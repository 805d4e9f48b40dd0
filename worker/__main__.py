"""Run one worker rank: python -m worker --config-json '<WorkerConfig JSON>' --uds /path/to/rank.sock

Loads the model (joining the process group first when world_size > 1), serves the router's gRPC service on
the unix socket (mode 0600) and logs "ready". A rank of a multi-node group outside node 0 serves on TCP
instead (`--listen host:port --token-stdin`): its first stdin line is the group's WORKER_TOKEN, which every
call must carry (worker/auth.py); the token never appears on the command line.
SIGTERM or SIGINT stops it gracefully: no new RPCs, the step in progress finishes, exit 0. A startup error
(bad config or model dir, unsupported architecture, a KV budget too small for one block, a socket or port
that cannot be bound, --listen without a token) is logged and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from worker.config import WorkerConfig
from worker.lora.reader import ReaderProcess
from worker.parallel import init_parallel
from worker.runner import ModelRunner
from worker.server import start_server, start_tcp_server, step_thread, stop_server

log = logging.getLogger("worker")
# How long RPCs in flight at shutdown get to finish; the step in progress is finished even after that.
SHUTDOWN_GRACE_S = 5.0
EXIT_BAD_CONFIG = 2
EXIT_STARTUP_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config-json", required=True, help="WorkerConfig as JSON (WorkerConfig.to_json())")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uds", type=Path, help="unix socket path to serve gRPC on")
    where.add_argument("--listen", metavar="HOST:PORT", help="TCP address to serve gRPC on (needs a token)")
    parser.add_argument(
        "--token-stdin", action="store_true", help="read the worker token from the first line of stdin"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def setup_logging(rank: int | str, level: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        force=True,
    )


def build_runner(config: WorkerConfig) -> ModelRunner:
    log.info(
        "loading %s (%s on %s, rank %d of %d)",
        config.model_dir,
        config.dtype,
        config.device,
        config.rank,
        config.world_size,
    )
    if not config.model_dir.is_dir():
        # transformers would read a missing path as a Hub repo id and say so, which misleads here.
        raise FileNotFoundError(f"model directory {str(config.model_dir)!r} does not exist")
    ctx = init_parallel(
        config.rank, config.world_size, config.master_addr, config.master_port, config.torch_device
    )
    runner = ModelRunner(config, ctx)
    log.info(
        "model loaded: %d KV blocks of %d tokens, %d adapter slots (max LoRA rank %d)",
        runner.kv.num_blocks,
        runner.kv.block_size,
        config.max_adapters,
        config.max_lora_rank,
    )
    return runner


async def serve(
    runner: ModelRunner,
    uds: Path | None,
    listen: str | None = None,
    token: str = "",
    steps: ThreadPoolExecutor | None = None,
    reader: ReaderProcess | None = None,
) -> int:
    """Serve on `uds`, or on TCP `listen` to callers with `token`, until SIGTERM or SIGINT, then stop
    gracefully. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if uds is not None:
            server, servicer = await start_server(runner, uds, steps, reader)
        else:
            assert listen is not None
            server, servicer = await start_tcp_server(runner, listen, token, steps, reader)
    except OSError as err:
        log.error("cannot serve: %s: %s", err, err.__cause__ or "")
        return EXIT_STARTUP_FAILED
    # The model's objects live as long as the process: keep the collector from scanning them during
    # steps, and at exit (which otherwise takes seconds).
    gc.freeze()
    log.info("ready: serving on %s", f"unix://{uds}" if uds is not None else f"{listen} (token required)")
    await stop.wait()
    log.info("stopping: finishing the RPCs in flight (grace %.0f s)", SHUTDOWN_GRACE_S)
    await stop_server(server, servicer, SHUTDOWN_GRACE_S)
    if uds is not None:
        uds.unlink(missing_ok=True)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = WorkerConfig.from_json(args.config_json)
    except (ValueError, TypeError) as err:
        setup_logging("?", args.log_level)
        log.error("bad --config-json: %s", err)
        return EXIT_BAD_CONFIG
    setup_logging(config.rank, args.log_level)
    token = sys.stdin.readline().strip() if args.token_stdin else ""
    if args.listen is not None and not token:
        log.error("--listen needs a non-empty worker token (--token-stdin): TCP callers must present it")
        return EXIT_BAD_CONFIG
    # Forked first, while this process has no other thread (worker/lora/reader.py).
    reader = ReaderProcess.fork(config.adapter_load_nice) if config.max_adapters > 0 else None
    steps = step_thread(config.rank)  # the runner is built on the thread that will run its steps
    try:
        runner = steps.submit(build_runner, config).result()
    except Exception as err:
        # Expected causes (bad model dir, unsupported architecture, KV budget) need no traceback.
        expected = isinstance(err, OSError | ValueError)
        log.error("cannot start: %s: %s", type(err).__name__, err, exc_info=not expected)
        return EXIT_STARTUP_FAILED
    try:
        return asyncio.run(serve(runner, args.uds, args.listen, token, steps, reader))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
