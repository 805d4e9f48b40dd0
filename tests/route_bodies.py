"""A request body each POST generation route accepts, shared by the access tests."""

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
}
