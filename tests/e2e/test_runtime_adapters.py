"""Adapters loaded at runtime (issue 15), end to end on SmolLM2-135M in float32 against transformers+peft.

One server holds a configured adapter (`pirate`, LORA_ADAPTERS) and finds the others on their first
request: `demo/robot` in a temporary Hugging Face cache, `team/mlp16` under a LORA_ADAPTER_ROOTS root.
The load and unload routes take `attn4` from that root; four bad adapters there are refused. The same
mixed batch runs again with NUM_SHARD=3 (SmolLM2's 9 heads and 3 KV heads, 3 per rank).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.adapter_factory import place_in_hf_cache, save_random_adapter, save_random_model, tiny_llama_config
from tests.e2e.harness import ROOT, Server, get, post, running
from tests.worker.peft_reference import load_peft_model, reference_logprobs

pytestmark = pytest.mark.slow

PROMPTS = ["Hello who are you?", "The capital of France is"]
NEW_TOKENS = 10
CONFIGURED, CACHED, ROOTED, BY_ROUTE = "pirate", "demo/robot", "team/mlp16", "attn4"
# Each broken adapter under the root and what its refusal must say.
BROKEN = {
    "corrupt": "corrupt or unreadable",
    "mismatched": "has shape",
    "other-base": "another base model",
    "rank-300": "raise MAX_LORA_RANK",  # over the auto MAX_LORA_RANK, 256
}
LOGPROB_ATOL = 1e-3  # float32 against float32


@pytest.fixture(scope="module")
def tree(smollm2_dir, tmp_path_factory):
    """The root, the HF cache and every adapter's directory (by adapter id)."""
    tmp = tmp_path_factory.mktemp("runtime-adapters")
    root, cache = tmp / "root", tmp / "hf-cache"
    paths = {
        CONFIGURED: ROOT / "demo_adapters" / "pirate",
        CACHED: place_in_hf_cache(ROOT / "demo_adapters" / "robot", cache, CACHED),
        ROOTED: save_random_adapter(
            smollm2_dir,
            root / ROOTED,
            r=16,
            alpha=16,
            target_modules=("gate_proj", "up_proj", "down_proj"),
            seed=1,
            std=0.05,
        ),
        BY_ROUTE: save_random_adapter(
            smollm2_dir, root / BY_ROUTE, r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=2
        ),
    }
    corrupt = shutil.copytree(ROOT / "demo_adapters" / "robot", root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    # The right config for SmolLM2, one tensor cut short: a shape the config and the base disagree with.
    mismatched = shutil.copytree(paths[BY_ROUTE], root / "mismatched")
    tensors = load_file(mismatched / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, mismatched / "adapter_model.safetensors")
    # A base with SmolLM2's 30 layers and modules but hidden size 64 (not 576).
    other_base = save_random_model(tiny_llama_config(num_hidden_layers=30), tmp / "other-base-model")
    save_random_adapter(other_base, root / "other-base", r=4, alpha=8, seed=3)
    save_random_adapter(smollm2_dir, root / "rank-300", r=300, alpha=32, target_modules=("q_proj",), seed=4)
    return SimpleNamespace(root=root, cache=cache, paths=paths)


class Reference:
    """transformers+peft with every adapter; each (adapter, prompt, tokens) is computed once, on one thread
    (on a busy 2-core machine torch's spinning threads made a SmolLM2 forward 6x slower than one thread)."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]):
        self.model = load_peft_model(model_dir, {self._name(a): path for a, path in adapters.items()})
        self._cache: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _name(adapter: str) -> str:
        return adapter.replace("/", "--")  # peft adapter names are module keys

    def logprobs(self, adapter: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        key = (adapter, tuple(prompt), tuple(tokens))
        if key not in self._cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                name = None if adapter is None else self._name(adapter)
                self._cache[key] = reference_logprobs(self.model, name, prompt, tokens)
            finally:
                torch.set_num_threads(threads)
        return self._cache[key]


@pytest.fixture(scope="module")
def reference(smollm2_dir, tree):
    return Reference(smollm2_dir, tree.paths)


def runtime_env(smollm2_dir, tree, **extra) -> dict[str, str]:
    return {
        "MODEL_ID": str(smollm2_dir),
        "DTYPE": "float32",
        "DEVICE": os.environ.get("MULTILORA_E2E_DEVICE", "cpu"),
        "LORA_ADAPTERS": f"{CONFIGURED}={tree.paths[CONFIGURED]}",
        "LORA_ADAPTER_ROOTS": str(tree.root),
        "HUGGINGFACE_HUB_CACHE": str(tree.cache),
        "KV_CACHE_MEMORY": "128MiB",
        **extra,
    }


@pytest.fixture(scope="module")
def server(smollm2_dir, tree, tmp_path_factory):
    with running(
        tmp_path_factory.mktemp("runtime") / "launcher.log", runtime_env(smollm2_dir, tree)
    ) as server:
        yield server


CASES = [(prompt, adapter) for adapter in (None, CONFIGURED, CACHED, ROOTED) for prompt in PROMPTS]


def generate(server: Server, prompt: str, adapter: str | None, max_new_tokens: int = NEW_TOKENS):
    params = {"max_new_tokens": max_new_tokens, "details": True, "decoder_input_details": True}
    return server.generate(prompt, **params, **({"adapter_id": adapter} if adapter else {}))


def all_at_once(server: Server, cases) -> list[dict]:
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: generate(server, *case), cases))
    for case, (status, body) in zip(cases, replies, strict=True):
        assert status == 200, (case, body, server.log()[-3000:])
    return [body for _, body in replies]


def assert_reference(reference: Reference, adapter: str | None, body: dict) -> None:
    """Greedy tokens equal transformers+peft's argmax after the same prefix; logprobs within LOGPROB_ATOL."""
    prompt = [t["id"] for t in body["details"]["prefill"]]
    tokens = [t["id"] for t in body["details"]["tokens"]]
    ref = reference.logprobs(adapter, prompt, tokens)
    assert tokens == ref.argmax(-1).tolist(), f"adapter {adapter}: greedy tokens differ from peft's"
    diff = max(abs(t["logprob"] - ref[i, t["id"]].item()) for i, t in enumerate(body["details"]["tokens"]))
    assert diff <= LOGPROB_ATOL, f"adapter {adapter}: max |logprob diff| {diff:.2e}"


def assert_cases_match(reference, cases, bodies) -> None:
    texts: dict[str | None, list[str]] = {}
    for (_, adapter), body in zip(cases, bodies, strict=True):
        assert_reference(reference, adapter, body)
        texts.setdefault(adapter, []).append(body["generated_text"])
    assert len({tuple(t) for t in texts.values()}) == len(texts), texts  # every adapter changes the output


def listed(server: Server) -> dict[str, dict]:
    """GET /v1/adapters by adapter name."""
    status, raw = get(server.url + "/v1/adapters")
    assert status == 200, raw
    return {entry["name"]: entry for entry in json.loads(raw)["adapters"]}


def test_first_requests_load_from_the_cache_and_a_root_in_a_mixed_batch(server, reference):
    assert not {CACHED, ROOTED} & set(listed(server))
    cold = all_at_once(server, CASES)  # the first requests of demo/robot and team/mlp16 load them
    assert_cases_match(reference, CASES, cold)
    shown = {name: (a["source"], a["state"], a["pinned"]) for name, a in listed(server).items()}
    assert {name: shown.get(name) for name in (CONFIGURED, CACHED, ROOTED)} == {
        CONFIGURED: ("startup", "resident", True),
        CACHED: ("hf-cache", "resident", False),
        ROOTED: ("root", "resident", False),
    }
    warm = all_at_once(server, CASES)  # all four in one batch
    assert [b["generated_text"] for b in warm] == [b["generated_text"] for b in cold]


def test_tensor_parallel_three_ranks(smollm2_dir, tree, reference, tmp_path):
    with running(tmp_path / "launcher.log", runtime_env(smollm2_dir, tree, NUM_SHARD="3")) as server:
        assert {"worker-0", "worker-1", "worker-2", "router"} <= set(server.child_pids())
        assert_cases_match(reference, CASES, all_at_once(server, CASES))


def test_load_generate_unload(server, tree, reference):
    name = "custom"
    status, body = post(
        server.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(tree.paths[BY_ROUTE])}
    )
    assert status == 200, body
    assert listed(server)[name]["state"] == "resident"
    status, body = generate(server, PROMPTS[0], name)
    assert status == 200, body
    assert_reference(reference, BY_ROUTE, body)
    status, body = post(server.url + "/v1/unload_lora_adapter", {"lora_name": name})
    assert status == 200, body
    assert listed(server).get(name, {}).get("state") in (None, "unloading")  # draining, never routable
    status, body = generate(server, PROMPTS[0], name)  # resolves nowhere now: not under the root
    assert status == 422 and name in body["error"], (status, body)


def test_broken_adapters_are_refused_while_others_are_served(server, reference):
    cases = [(PROMPTS[1], CONFIGURED), *((PROMPTS[0], name) for name in BROKEN), (PROMPTS[0], ROOTED)]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: generate(server, *case, max_new_tokens=24), cases))
    for (_, adapter), (status, body) in zip(cases, replies, strict=True):
        if adapter in BROKEN:
            assert 400 <= status < 500, (adapter, status, body)
            assert adapter in body["error"] and BROKEN[adapter] in body["error"], body
        else:
            assert status == 200, (adapter, body)
            assert_reference(reference, adapter, body)
    adapters = listed(server)  # a refused first request leaves at most a failed entry
    assert {adapters.get(name, {}).get("state") for name in BROKEN} <= {None, "failed"}, adapters
