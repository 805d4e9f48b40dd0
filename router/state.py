"""What the request handlers share, set up once at startup: `app[STATE]`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from proto import generate_pb2 as pb
from router.adapter_registry import AdapterRegistry
from router.client import ShardedClient
from router.config import RouterConfig
from router.errors import OverloadedError
from router.limits import Limits
from router.metrics import Metrics
from router.scheduler import Scheduler
from router.tokenizer import ModelTokenizer
from router.validation import Validator


class ConcurrencyLimit:
    """TGI's `max_concurrent_requests` semaphore: taken without waiting, full means 429."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    @contextlib.contextmanager
    def acquire(self) -> Iterator[None]:
        if self.in_use >= self.limit:
            raise OverloadedError()
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


@dataclass
class State:
    config: RouterConfig
    client: ShardedClient
    worker_info: pb.InfoResponse
    limits: Limits
    tokenizer: ModelTokenizer
    adapters: AdapterRegistry
    validator: Validator
    scheduler: Scheduler
    concurrency: ConcurrencyLimit
    metrics: Metrics


CONFIG = web.AppKey("config", RouterConfig)
STATE = web.AppKey("state", State)
