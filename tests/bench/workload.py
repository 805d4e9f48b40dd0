"""The requests of a benchmark run: prompts, output lengths, adapters and arrival times, all seeded.

The same `Request` list goes to every system compared (our server base-only, with adapters, and the
transformers+peft baseline), so they see the same prompts and ask for the same numbers of tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.json")


@dataclass(frozen=True)
class Request:
    index: int
    text: str  # the prompt as sent: a chat rendered with the model's template
    max_new_tokens: int
    adapter: str | None = None  # None: the base model


def load_prompts() -> list[str]:
    return json.loads(PROMPTS_FILE.read_text())["prompts"]


def render_chat(model_dir: Path, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn in the model's chat template, ready for generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def output_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    """n lengths drawn uniformly from [low, high] (integers), reproducibly."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def popularity_weights(num_adapters: int, popularity: str, zipf_s: float = 1.0) -> list[float]:
    """uniform, or zipf: adapter i (0-based) is chosen with probability proportional to 1/(i+1)^s."""
    if popularity == "uniform":
        return [1.0] * num_adapters
    if popularity == "zipf":
        return [1.0 / (i + 1) ** zipf_s for i in range(num_adapters)]
    raise ValueError(f"popularity must be uniform or zipf, got {popularity!r}")


def build_requests(texts: list[str], n: int, lengths: tuple[int, int], seed: int) -> list[Request]:
    """n base-model requests cycling over `texts` in a seeded shuffled order, with seeded lengths."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sizes = output_lengths(n, *lengths, seed=seed + 1)
    return [Request(i, texts[order[i % len(order)]], sizes[i]) for i in range(n)]


def with_adapters(
    requests: list[Request], adapters: list[str], popularity: str, seed: int, zipf_s: float = 1.0
) -> list[Request]:
    """The same requests, each sent to an adapter drawn (seeded) by `popularity` over `adapters`."""
    if not adapters:
        return [replace(r, adapter=None) for r in requests]
    weights = popularity_weights(len(adapters), popularity, zipf_s)
    picks = random.Random(seed).choices(adapters, weights=weights, k=len(requests))
    return [replace(r, adapter=a) for r, a in zip(requests, picks, strict=True)]


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of n arrivals of a Poisson process of `rate` requests/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out
