"""multilora launcher: parse the settings, spawn the worker ranks, then the router; forward signals.

    python launcher.py --help            # every setting, its default and its environment variable

Settings come from CLI flags (`--model-id`) or environment variables with TGI's names (`MODEL_ID`), and
nowhere else. They are composed once into one `WorkerConfig` per rank and one `RouterConfig`, which the
children receive as JSON: a worker on its command line (`--config-json`), the router on its stdin
(`--config-json -`), because its config holds API_KEY and a command line is visible to every user in
`ps`. API_KEY is also left out of the children's environment.
Startup: resolve the model and the LORA_ADAPTERS entries to local directories, start NUM_SHARD workers
(`python -m worker`), wait until each listens on its socket, then start the router (`python -m router`),
which loads the LORA_ADAPTERS and serves HTTP; other adapters it loads when requests name them
(LORA_ADAPTER_ROOTS, the Hugging Face cache, the Hub with ADAPTER_DOWNLOAD).
One tensor-parallel group can span NUM_NODES nodes, one launcher each (launch/nodes.py): node NODE_RANK
starts its share of the ranks; only node 0 starts the router, which reaches the other nodes' ranks over
TCP (WORKER_ADDRESSES) with WORKER_TOKEN.
Shutdown on SIGTERM/SIGINT: the router first (it stops accepting and finishes in-flight requests), then
the workers; exit 0. If any child dies, the others are stopped and the launcher exits 1.

This file is the entry point only; the parts live in the `launch` package (launch/__init__.py lists them).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence

from launch.composition import prepare
from launch.nodes import listen_addresses, rank_listening
from launch.settings import SettingsError, load_settings
from launch.supervision import supervise, worker_listening

logger = logging.getLogger("launcher")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        settings = load_settings(argv)
        workers, router, uds_dir = prepare(settings)
    except SettingsError as exc:
        logger.error("%s", exc)
        return 1
    logger.info(
        "model %s: %d rank(s) on %s in %s, %d adapter slot(s), max LoRA rank %d",
        router.model_dir,
        len(workers),
        workers[0].device,
        workers[0].dtype,
        workers[0].max_adapters,
        workers[0].max_lora_rank,
    )
    py = sys.executable
    if settings.node_rank > 0:  # its ranks serve node 0's router over TCP; no router here
        listen = listen_addresses(settings.node_layout, settings.hostname, settings.worker_port_base)
        try:
            return supervise(
                [
                    [py, "-m", "worker", "--config-json", w.to_json(), "--listen", a, "--token-stdin"]
                    for w, a in zip(workers, listen, strict=True)
                ],
                None,
                lambda index: rank_listening(listen[index]),
                settings.graceful_termination_timeout,
                worker_ranks=[w.rank for w in workers],
                worker_stdin=f"{settings.worker_token}\n".encode(),
            )
        finally:
            shutil.rmtree(uds_dir, ignore_errors=True)
    try:
        return supervise(
            [
                [py, "-m", "worker", "--config-json", w.to_json(), "--uds", u]
                for w, u in zip(workers, router.worker_uds, strict=True)
            ],
            [py, "-m", "router", "--config-json", "-"],
            lambda rank: worker_listening(router.worker_uds[rank]),
            settings.graceful_termination_timeout,
            router_stdin=router.model_dump_json().encode(),
        )
    finally:
        shutil.rmtree(uds_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
