"""Router test fixtures: a tiny byte-level tokenizer, fake worker ranks, an adapter root, and the app under
a test client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from router.app import create_app
from router.client import ShardedClient
from router.config import AdapterSource, RouterConfig
from router.state import STATE, State
from tests.router.fake_worker import FakeWorker, serve_fakes

BASE_MODEL_ID = "tiny-base"
ADAPTER_IDS = ("org/adapter-one", "adapter-two")
# What each adapter slot generates before EOS (slot 0 = base model; 1 and 2 hold ADAPTER_IDS at startup).
SCRIPTS = {0: " hello world, said the base", 1: " one one one one one", 2: " two, two; two. two"}
# Adapters in the adapter root every router gets (ROOT_ADAPTERS): what the fake makes them generate.
ROOT_ADAPTERS = (*(f"lora-{i:02d}" for i in range(16)), "org/lora-x", "a_r4", "b_r8", "c_r16")


def root_text(adapter_id: str) -> str:
    return f" <{adapter_id}>"


# The tiny tokenizer's chat template; it writes BOS itself, so the router must not add another.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def build_tiny_tokenizer(out: Path, *, bos_template: bool = True, config: dict | None = None) -> Path:
    """Byte-level tokenizer: 3 special tokens, then one token per byte; its post-processor adds BOS."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        **(config or {}),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(
        tmp_path_factory.mktemp("tiny-tokenizer"), config={"chat_template": CHAT_TEMPLATE}
    )


@pytest.fixture(scope="session")
def encode(tiny_tokenizer_dir):
    tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def write_fake_adapter(directory: Path) -> Path:
    """A directory the resolver accepts (the fake workers never read it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    return directory


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-root")
    for name in ROOT_ADAPTERS:
        write_fake_adapter(root / name)
    return root


@pytest.fixture
def sock_dir():
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="mlr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Harness:
    http: TestClient
    fakes: list[FakeWorker]
    config: RouterConfig

    @property
    def state(self) -> State:
        return self.http.server.app[STATE]

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until nothing runs or waits and every KV block is free again (Release has returned)."""
        sched = self.state.scheduler
        async with asyncio.timeout(timeout):
            while sched.running or len(sched.queue) or sched.blocks.num_free != sched.blocks.num_blocks:
                await asyncio.sleep(0.005)

    async def generate(self, inputs: str = "Hi", path: str = "/generate", **parameters):
        return await self.http.post(path, json={"inputs": inputs, "parameters": parameters})


async def _check_blocks_returned(http: TestClient, timeout: float = 0.5) -> None:
    """After every test: once the scheduler is idle, every KV block is free again (none leaked)."""
    sched = http.server.app[STATE].scheduler
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while sched.running or len(sched.queue) or sched.blocks.num_free != sched.blocks.num_blocks:
                await asyncio.sleep(0.005)
    if not sched.running and not len(sched.queue):
        assert sched.blocks.num_free == sched.blocks.num_blocks, "KV blocks leaked"


@pytest.fixture
async def start_router(tiny_tokenizer_dir, sock_dir, encode, adapter_root, tmp_path):
    """`await start_router(world_size=2, fake={...}, **RouterConfig overrides)` -> Harness.

    The router has `adapter_root` as its adapter root and an empty HF cache of its own."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, world_size: int = 2, fake: dict | None = None, adapters=ADAPTER_IDS, **overrides):
            script = {
                0: encode(SCRIPTS[0]),
                ADAPTER_IDS[0]: encode(SCRIPTS[1]),
                ADAPTER_IDS[1]: encode(SCRIPTS[2]),
            }
            fakes, paths = await stack.enter_async_context(
                serve_fakes(
                    sock_dir,
                    world_size,
                    script=script,
                    default_script=lambda adapter_id: encode(root_text(adapter_id)),
                    **(fake or {}),
                )
            )
            overrides.setdefault("adapter_roots", [str(adapter_root)])
            overrides.setdefault("hf_cache_dir", str(tmp_path / "hf-cache"))
            config = RouterConfig(
                model_id=BASE_MODEL_ID,
                model_dir=str(tiny_tokenizer_dir),
                worker_uds=paths,
                adapters=[AdapterSource(id=a, source=f"hub:{a}", path=f"/adapters/{a}") for a in adapters],
                worker_connect_timeout_s=5.0,
                **overrides,
            )
            client = ShardedClient(paths)
            stack.push_async_callback(client.close)
            http = TestClient(TestServer(create_app(config, client=client)))
            await http.start_server()
            stack.push_async_callback(http.close)
            stack.push_async_callback(_check_blocks_returned, http)
            return Harness(http, fakes, config)

        yield start
