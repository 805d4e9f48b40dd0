"""The launcher's parts; `launcher.py` is the entry point that runs them.

- `settings`: every setting, a CLI flag and an environment variable with TGI's name;
- `dtype`: what DTYPE=auto resolves to on this machine;
- `model_source`: MODEL_ID and adapter ids resolved to local directories;
- `adapters`: LORA_ADAPTERS parsed and resolved, with each adapter's LoRA rank;
- `nodes`: the nodes of one tensor-parallel group (NUM_NODES > 1);
- `compose`: the settings composed into one WorkerConfig per rank and the RouterConfig;
- `supervision`: the child processes, signals and the ordered stop.

Nothing here imports router or worker runtime code: only `router.config` and `worker.config`.
"""
