"""huggingface_hub's InferenceClient and AsyncInferenceClient against a running server; prints one JSON line.

Run as a script by tests/e2e/test_api_clients.py, in the test venv (huggingface_hub >= 1.0) and in a venv
of its own with 0.36 (the version text-generation and lorax-client pin), so it imports nothing but the
standard library and huggingface_hub. The test asserts on the output; this script only records what the
client returned or raised.

    python hub_client.py '{"url": ..., "prompt": ..., "messages": [...], "adapters": [...], "new_tokens": 8}'
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib import metadata

from huggingface_hub import AsyncInferenceClient, InferenceClient

TIMEOUT_S = 120
MISSING = "no-such-adapter"


def error(call) -> dict:
    """What `call()` raised: class, message, HTTP status (None when the call unexpectedly succeeded)."""
    try:
        result = call()
        if not isinstance(result, str | dict):
            list(result)  # a stream raises on iteration
    except Exception as e:  # the test asserts on the class
        response = getattr(e, "response", None)
        return {
            "class": type(e).__name__,
            "message": str(e),
            "status": getattr(response, "status_code", None),
        }
    return {"class": None, "message": "no error", "status": None}


def details(r) -> dict:
    return {
        "generated_text": r.generated_text,
        "finish_reason": r.details.finish_reason,
        "generated_tokens": r.details.generated_tokens,
        "token_ids": [t.id for t in r.details.tokens],
    }


def sync_scenarios(cfg: dict) -> dict:
    url, prompt, messages, n = cfg["url"], cfg["prompt"], cfg["messages"], cfg["new_tokens"]
    client = InferenceClient(base_url=url, timeout=TIMEOUT_S)
    out: dict = {"base_text": client.text_generation(prompt, max_new_tokens=n)}
    # Without details, a stream yields each token's text (special ones included).
    out["base_stream_texts"] = list(client.text_generation(prompt, max_new_tokens=n, stream=True))
    out["adapters"] = {}
    for adapter in cfg["adapters"]:
        r = client.text_generation(prompt, adapter_id=adapter, max_new_tokens=n, details=True)
        events = list(
            client.text_generation(prompt, adapter_id=adapter, max_new_tokens=n, details=True, stream=True)
        )
        chat = client.chat_completion(messages, model=adapter, max_tokens=n, temperature=0)
        chunks = list(
            client.chat_completion(messages, model=adapter, max_tokens=n, temperature=0, stream=True)
        )
        out["adapters"][adapter] = {
            "generate": details(r),
            "stream_token_ids": [e.token.id for e in events],
            "stream_generated_text": events[-1].generated_text if events else None,
            "stream_finish_reason": events[-1].details.finish_reason if events else None,
            "chat": chat.choices[0].message.content,
            "chat_model": chat.model,
            "chat_stream": [c.choices[0].delta.content for c in chunks if c.choices],
        }
    # No `model=`: huggingface_hub sends "dummy".
    chat = client.chat_completion(messages, max_tokens=n, temperature=0)
    out["default_chat"] = {"content": chat.choices[0].message.content, "model": chat.model}
    out["errors"] = {
        "generate": error(lambda: client.text_generation(prompt, adapter_id=MISSING, max_new_tokens=2)),
        "stream": error(
            lambda: client.text_generation(prompt, adapter_id=MISSING, max_new_tokens=2, stream=True)
        ),
        "chat": error(lambda: client.chat_completion(messages, model=MISSING, max_tokens=2)),
    }
    info = InferenceClient(base_url=url, provider="hf-inference", timeout=TIMEOUT_S)
    out["health"] = info.health_check()
    out["info_model_id"] = info.get_endpoint_info()["model_id"]
    return out


async def async_scenarios(cfg: dict) -> dict:
    url, prompt, messages, n = cfg["url"], cfg["prompt"], cfg["messages"], cfg["new_tokens"]
    adapter = cfg["adapters"][0]
    async with AsyncInferenceClient(base_url=url, timeout=TIMEOUT_S) as client:
        r = await client.text_generation(prompt, adapter_id=adapter, max_new_tokens=n, details=True)
        stream = await client.text_generation(
            prompt, adapter_id=adapter, max_new_tokens=n, details=True, stream=True
        )
        events = [e async for e in stream]
        chat = await client.chat_completion(messages, model=adapter, max_tokens=n, temperature=0)
        stream = await client.chat_completion(
            messages, model=adapter, max_tokens=n, temperature=0, stream=True
        )
        chunks = [c async for c in stream]
        try:
            await client.text_generation(prompt, adapter_id=MISSING, max_new_tokens=2)
            missing = None
        except Exception as e:  # the test asserts on the class
            missing = type(e).__name__
    return {
        "adapter": adapter,
        "generate": details(r),
        "stream_token_ids": [e.token.id for e in events],
        "chat": chat.choices[0].message.content,
        "chat_stream": [c.choices[0].delta.content for c in chunks if c.choices],
        "missing_adapter_error": missing,
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result = {
        "version": metadata.version("huggingface_hub"),
        "sync": sync_scenarios(cfg),
        "async": asyncio.run(async_scenarios(cfg)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
