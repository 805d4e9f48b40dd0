"""A request body each POST route accepts, shared by the access tests (in sorted order, the load route's
body comes before the unload route's, which unloads what it loaded: `a_r4` lies in both test setups'
adapter roots)."""

BODIES = {
    "/generate": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
    "/tokenize": {"inputs": "Hi"},
    "/v1/completions": {"model": "tgi", "prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {
        "model": "tgi",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    },
    "/v1/load_lora_adapter": {"lora_name": "access-check", "lora_path": "a_r4"},
    "/v1/unload_lora_adapter": {"lora_name": "access-check"},
}
