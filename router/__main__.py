"""`python -m router --config-json '<RouterConfig as JSON>'`: connect to the workers, then serve HTTP.

`--config-json -` reads the JSON from stdin instead (the launcher's way: the config holds API_KEY, and a
command line is visible to every user in `ps`).

Startup: bind hostname:port (first, so that nothing started meanwhile, such as the public gRPC server on
an ephemeral port, can take it), wait for every worker rank (up to worker_connect_timeout_s), read Info,
load the adapters, then listen. SIGTERM/SIGINT stop accepting connections, let requests in flight finish
(up to shutdown_timeout_s), and exit 0. A startup failure logs its reason and exits 1 (2 for a bad config).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys

import pydantic
from aiohttp import web

from router.adapters import AdapterLoadError
from router.app import create_app
from router.client import WorkerError
from router.config import RouterConfig
from router.limits import ConfigError

log = logging.getLogger("router")

# Startup failures whose message says it all (no traceback).
_EXPECTED = (AdapterLoadError, ConfigError, WorkerError, TimeoutError, FileNotFoundError, OSError)


def bind_http(hostname: str, port: int) -> socket.socket:
    """The HTTP socket, bound now (OSError if the port is taken) but not listening: until the app is
    ready, a connection is refused, as before startup."""
    sock = socket.socket(socket.AF_INET6 if ":" in hostname else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's own sites do
    try:
        sock.bind((hostname, port))
    except OSError:
        sock.close()
        raise
    return sock


async def serve(config: RouterConfig) -> None:
    sock = bind_http(config.hostname, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        create_app(config),
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=config.shutdown_timeout_s,
        access_log=None,
    )
    setup = asyncio.ensure_future(runner.setup())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([setup, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not setup.done():
        log.info("Signal received during startup; stopping")
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        return
    stopped.cancel()
    setup.result()  # raises the startup failure
    try:
        await web.SockSite(runner, sock).start()
        log.info("Router listening on http://%s:%d", config.hostname, config.port)
        await stop.wait()
        log.info("Shutting down: finishing requests in flight (up to %.0f s)", config.shutdown_timeout_s)
    finally:
        await runner.cleanup()
    log.info("Router stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config-json",
        required=True,
        help="a RouterConfig as JSON (router/config.py), or - to read it from stdin",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    text = sys.stdin.read() if args.config_json == "-" else args.config_json
    try:
        config = RouterConfig.model_validate_json(text)
    except pydantic.ValidationError as e:
        log.error("Invalid --config-json: %s", e)
        return 2
    try:
        asyncio.run(serve(config))
    except _EXPECTED as e:
        log.error("Router startup failed: %s", e)
        return 1
    except Exception:
        log.exception("Router failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
