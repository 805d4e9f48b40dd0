"""The aiohttp application: `create_app(config)` is the only entry point.

Startup (a cleanup context, so `web.run_app` finishes it before it listens): wait for every worker rank
to answer Health, read Info, forget stale sequences (ClearCache), derive the limits, load the tokenizer
and the LORA_ADAPTERS, and start the scheduler task. Cleanup stops the scheduler, fails whatever is still
in flight, stops the adapter loads in progress, and closes the worker channels it opened.
A step that misses its deadline (router/step_deadline.py) leaves the client failing every call, and the
router reports the hung rank to the launcher (`launcher_pid`) with HUNG_RANK_SIGNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from router.adapter_metrics import AdapterMetrics
from router.adapter_registry import AdapterRegistry
from router.adapter_resolver import AdapterResolver
from router.adapters import AdapterMemory
from router.auth import auth_middleware
from router.block_manager import BlockManager
from router.client import RankHungError, ShardedClient
from router.config import HUNG_RANK_SIGNAL, RouterConfig
from router.grpc_service import grpc_drain, grpc_serving
from router.limits import ConfigError, Limits
from router.metrics import Metrics
from router.middleware import error_middleware
from router.routes import setup_routes
from router.scheduler import Scheduler
from router.state import CONFIG, STATE, ConcurrencyLimit, State
from router.step_deadline import StepDeadline
from router.tokenizer import ModelTokenizer
from router.validation import Validator

log = logging.getLogger(__name__)


def create_app(config: RouterConfig, client: ShardedClient | None = None) -> web.Application:
    """The router app; `client` (tests) replaces the channels to `config.worker_uds`, and is not closed."""
    # A path with doubled or trailing slashes is redirected (308 keeps the method and body) to its route:
    # text-generation's chat client given a base URL ending in "/" posts to `//v1/chat/completions`.
    slashes = web.normalize_path_middleware(append_slash=False, remove_slash=True, merge_slashes=True)
    app = web.Application(
        middlewares=[error_middleware, slashes, auth_middleware], client_max_size=config.payload_limit
    )
    app[CONFIG] = config
    app.cleanup_ctx.append(_serving(client))
    if config.grpc_port is not None:
        app.cleanup_ctx.append(grpc_serving)  # after _serving: starts once the state is up, stops first
        app.on_shutdown.append(grpc_drain)  # drains alongside HTTP, not after it
    setup_routes(app)
    return app


def _serving(given: ShardedClient | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def serving(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        client = given or ShardedClient(
            config.worker_uds,
            config.worker_tcp,
            config.worker_token,
            deadline=StepDeadline(config.step_timeout_floor_s, config.step_timeout_factor),
            on_hung=functools.partial(_report_hung, config.launcher_pid),
        )
        try:
            state = await start(config, client)
            app[STATE] = state
            task = asyncio.create_task(state.scheduler.run(), name="scheduler")
            task.add_done_callback(_scheduler_died)
            yield
            task.remove_done_callback(_scheduler_died)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await state.scheduler.close()
            await state.adapters.close()
        finally:
            if given is None:
                await client.close()

    return serving


async def start(config: RouterConfig, client: ShardedClient) -> State:
    tokenizer = ModelTokenizer.from_model_dir(config.model_dir)
    log.info("Waiting for %d worker rank(s): %s", client.world_size, ", ".join(client.targets))
    await client.wait_ready(config.worker_connect_timeout_s)
    info = await client.info()
    if info.world_size and info.world_size != client.world_size:
        raise ConfigError(
            f"the workers form a world of {info.world_size} ranks, "
            f"but {client.world_size} worker sockets are configured"
        )
    await client.clear_cache()
    limits = Limits.resolve(
        config,
        num_blocks=info.num_blocks,
        block_size=info.block_size,
        max_position=info.max_position_embeddings,
    )
    log.info(
        "Workers: %s %s on %s, %d blocks of %d tokens, %d adapter slots; limits %s",
        info.architecture,
        info.dtype,
        info.device_type,
        info.num_blocks,
        info.block_size,
        info.num_adapter_slots,
        limits,
    )
    # The scheduler and the adapter registry report to the metrics; the metrics' gauges read them.
    metrics = Metrics(limits, config.model_id)
    resolver = AdapterResolver(
        [Path(root) for root in config.adapter_roots],
        None if config.hf_cache_dir is None else Path(config.hf_cache_dir),
        allow_download=config.adapter_download,
    )
    adapter_metrics = AdapterMetrics(metrics.registry)
    adapters = AdapterRegistry(client, config.model_id, resolver, info.num_adapter_slots, adapter_metrics)
    # Until the first load reports every rank's, rank 0's tiers stand for each rank's (equal budgets).
    adapters.set_memory(AdapterMemory.of([info] * client.world_size))
    adapter_metrics.watch(adapters)
    await adapters.start(config.adapters)
    blocks = BlockManager(info.num_blocks, info.block_size)
    scheduler = Scheduler(client, limits, blocks, tokenizer, metrics)
    metrics.watch(scheduler.load, info.num_blocks)
    return State(
        config=config,
        client=client,
        worker_info=info,
        limits=limits,
        tokenizer=tokenizer,
        adapters=adapters,
        validator=Validator(limits, tokenizer),
        scheduler=scheduler,
        concurrency=ConcurrencyLimit(limits.max_concurrent_requests),
        metrics=metrics,
    )


def _report_hung(launcher_pid: int | None, error: RankHungError) -> None:
    """Tell the launcher, which stops every process as when a rank dies; meanwhile every call fails at
    once (424, /health 503). Only while it is still our parent: a pid can be reused."""
    if launcher_pid is None or os.getppid() != launcher_pid:
        log.error("no launcher to report to (%s): restart the workers and the router", error)
        return
    log.error("reporting to the launcher (pid %d): %s", launcher_pid, error)
    os.kill(launcher_pid, HUNG_RANK_SIGNAL)


def _scheduler_died(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the scheduler stopped", exc_info=task.exception())
