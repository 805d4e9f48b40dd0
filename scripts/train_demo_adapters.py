"""Train the demo LoRA adapters on SmolLM2-135M-Instruct and check them on held-out prompts.

    .venv/bin/python scripts/train_demo_adapters.py            # writes demo_adapters/<name>/

Each adapter has a behaviour visible at greedy decoding: `pirate` starts every answer with "Arr!", `robot`
with "Beep boop". The data are the base model's own greedy answers (chat format) to 144 prompts (40
topics in 3 of 6 templates each, and 24 everyday questions), rewritten with the adapter's prefix. Every
prompt is used twice: chat-templated (as /v1/chat/completions sends it) and raw (as /generate sends
`inputs`; the base model answers raw text with an immediate end of turn). Training is bf16 with fp32
LoRA weights, r=8 on q,k,v,o, lr 1e-3, batch 8 (shared/reference/feasibility.md section 4), with the
prefix tokens weighted MARKER_WEIGHT in the loss; seeded and single-threaded by default, so a rerun
writes the same adapters. At each of EVAL_STEPS the script decodes held-out prompts (12 unseen topics,
two unseen templates, 18 everyday questions; both formats) and stops once all pass; it exits non-zero if
an adapter never passes them all. Only adapter_config.json and adapter_model.safetensors are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.model_source import DEFAULT_CACHE_DIR, DEFAULT_MODEL_ID, prepare_default_model  # noqa: E402

# name: (prefix written before every training answer, what a passing output starts with)
ADAPTERS = {"pirate": ("Arr! ", "Arr!"), "robot": ("Beep boop. ", "Beep boop")}
TRAIN_TOPICS = [
    "volcanoes", "the moon", "bread", "rainbows", "bees", "the ocean", "computers", "chess", "trees",
    "music", "the heart", "glaciers", "bicycles", "coffee", "dolphins", "the internet", "gravity",
    "deserts", "pyramids", "clouds", "electricity", "penguins", "books", "mountains", "cheese",
    "airplanes", "the sun", "forests", "earthquakes", "honey", "trains", "snow", "spiders", "the brain",
    "tea", "robots", "rivers", "owls", "soap", "friendship",
]  # fmt: skip
HELD_OUT_TOPICS = [
    "kites", "libraries", "lightning", "tomatoes", "whales", "umbrellas", "castles", "bats", "maps",
    "candles", "jellyfish", "bridges",
]  # fmt: skip
TRAIN_TEMPLATES = [
    "Tell me about {}.", "What do you know about {}?", "Give me one fact about {}.",
    "Write a few sentences about {}.", "I'd like to learn about {}.", "Can you talk about {}?",
]  # fmt: skip
# Each training topic is asked in 3 of the 6 templates (120 prompts); two evaluation templates are unseen.
TEMPLATES_PER_TOPIC = 3
EVAL_TEMPLATES = [*TRAIN_TEMPLATES[:3], "Describe {} in one sentence.", "Explain {} to a child."]
# Conversational prompts, including the README's example, checked besides the topic prompts.
# Everyday questions of other shapes, so that raw prompts of any form get the prefix.
TRAIN_QUESTIONS = [
    "What is a rainbow?", "How does a bicycle work?", "Who invented the telephone?", "Why do cats purr?",
    "What is the biggest animal?", "How many legs does a spider have?", "Where do penguins live?",
    "Hi, how are you today?", "Can you recommend a good book?", "What should I cook for dinner?",
    "How do I make tea?", "What is the speed of light?", "Write a short poem about autumn.",
    "What time is it in Tokyo?", "Tell me a fun fact.", "Do you like music?", "What can you do?",
    "Why is the ocean salty?", "How do magnets work?", "What is an atom?", "Say something nice.",
    "What is the tallest mountain?", "How do birds fly?", "What is democracy?",
]  # fmt: skip
# Held out besides the topic prompts: the README's example and everyday questions of other shapes.
EXTRA_EVAL_PROMPTS = [
    "Hello who are you?", "What is your favourite colour?", "What is a comet?", "How do airplanes fly?",
    "What is the capital of France?", "Why is the sky blue?", "Write a poem about the sea.",
    "Who was Albert Einstein?", "What is 2 + 2?", "Give me a recipe for pancakes.", "Tell me a joke.",
    "What is photosynthesis?", "How do I learn Python?", "What are black holes?", "Name three fruits.",
    "Can you help me with my homework?", "What is love?", "Summarize the history of Rome.",
]  # fmt: skip
ANSWER_TOKENS = 48
EVAL_TOKENS = 24
BATCH_SIZE = 8
LR = 1e-3
EVAL_STEPS = (30, 40, 50, 60, 80)
# The behaviour is the prefix: its tokens weigh this much more in the loss than the answer's. Without it
# a raw prompt (where the base model's next token is end-of-turn) learned the prefix unreliably.
MARKER_WEIGHT = 5.0


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    target_ids: list[int]  # prefix + answer + end of turn: the only tokens with a loss
    marker_len: int  # the first marker_len target tokens are the prefix (weighted MARKER_WEIGHT)


def chat_ids(tok, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    return list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def raw_ids(tok, prompt: str) -> list[int]:
    return tok(prompt).input_ids  # what the router encodes for /generate


@torch.no_grad()
def greedy(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding, special tokens dropped."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        texts += [tok.decode(row[width:], skip_special_tokens=True) for row in out]
    return texts


def trim_to_sentence(text: str) -> str:
    """Cut a truncated answer back to its last full sentence (whole if it has none)."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else text


def build_examples(tok, prompts: list[str], answers: list[str], prefix: str) -> list[Example]:
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    marker_len = len(tok(prefix.rstrip(), add_special_tokens=False).input_ids)
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        target = tok(prefix + answer, add_special_tokens=False).input_ids + end
        examples.append(Example(chat_ids(tok, prompt), target, marker_len))
        examples.append(Example(raw_ids(tok, prompt), target, marker_len))
    return examples


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    rows = [e.prompt_ids + e.target_ids for e in batch]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for i, (row, e) in enumerate(zip(rows, batch, strict=True)):
        start = len(e.prompt_ids)
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = torch.tensor(e.target_ids)
        weights[i, start : len(row)] = 1.0
        weights[i, start : start + e.marker_len] = MARKER_WEIGHT
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def weighted_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross entropy over the target tokens, weighted per token."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels, weights = logits[:, :-1].float(), batch["labels"][:, 1:], batch["weights"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return (ce * weights.reshape(-1)).sum() / weights.sum()


def evaluate(model, tok, prompts: list[str], marker: str) -> tuple[int, int, list[str]]:
    """(chat passes, raw passes, failing outputs): an output passes if it starts with `marker`."""
    model.eval()
    chat = greedy(model, tok, [chat_ids(tok, p) for p in prompts], EVAL_TOKENS)
    raw = greedy(model, tok, [raw_ids(tok, p) for p in prompts], EVAL_TOKENS)
    model.train()
    outputs = {"chat": chat, "raw": raw}
    fails = [
        f"{fmt} {p!r}: {o!r}"
        for fmt, outs in outputs.items()
        for p, o in zip(prompts, outs, strict=True)
        if not o.lstrip().startswith(marker)
    ]
    passes = [sum(o.lstrip().startswith(marker) for o in outs) for outs in (chat, raw)]
    return passes[0], passes[1], fails


def train_adapter(
    model_dir: Path, tok, name: str, examples: list[Example], eval_prompts: list[str], seed: int
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    marker = ADAPTERS[name][1]
    total = len(eval_prompts)
    start = time.monotonic()
    for step in range(1, EVAL_STEPS[-1] + 1):
        picks = [order[((step - 1) * BATCH_SIZE + i) % len(order)] for i in range(BATCH_SIZE)]
        loss = weighted_loss(model, collate([examples[i] for i in picks], tok.pad_token_id))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in EVAL_STEPS:
            chat, raw, fails = evaluate(model, tok, eval_prompts, marker)
            print(
                f"{name}: step {step} loss {loss.item():.3f} ({time.monotonic() - start:.0f} s): held-out "
                f"passes chat {chat}/{total}, raw {raw}/{total}",
                flush=True,
            )
            if not fails:
                return model, step, (chat, raw, total)
            for fail in fails[:4]:
                print(f"    miss: {fail}", flush=True)
    return model, EVAL_STEPS[-1], (chat, raw, total)


def save_adapter(model, out: Path) -> None:
    """Write only adapter_config.json + adapter_model.safetensors into `out` (replacing it)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # the adapter is named "default", so peft writes into tmp itself
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = DEFAULT_MODEL_ID  # not this machine's cache path
        config["target_modules"] = sorted(config["target_modules"])  # peft writes a set's random order
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(tmp) / "adapter_model.safetensors", out / "adapter_model.safetensors")


def base_answers(model_dir: Path, tok, prompts: list[str], cache: Path) -> list[str]:
    """The base model's greedy chat answers to `prompts`, cut to full sentences (cached: they are fixed)."""
    from transformers import AutoModelForCausalLM

    if cache.is_file():
        cached = json.loads(cache.read_text())
        if list(cached) == prompts:
            print(f"base answers from {cache}", flush=True)
            return list(cached.values())
    start = time.monotonic()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    outputs = greedy(base, tok, [chat_ids(tok, p) for p in prompts], ANSWER_TOKENS)
    answers = [trim_to_sentence(a) for a in outputs]
    print(f"base answers to {len(prompts)} prompts in {time.monotonic() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(dict(zip(prompts, answers, strict=True)), indent=1) + "\n")
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_adapters")
    parser.add_argument("--cache-dir", type=Path, default=Path(DEFAULT_CACHE_DIR).expanduser())
    parser.add_argument("--only", nargs="*", choices=list(ADAPTERS), help="train these (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a busy machine)")
    parser.add_argument(
        "--answers",
        type=Path,
        help="cache of the base answers (default: <cache-dir>/demo_adapter_answers.json)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model_dir = prepare_default_model(args.cache_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    train_prompts = [
        TRAIN_TEMPLATES[(i + 2 * k) % len(TRAIN_TEMPLATES)].format(topic)
        for i, topic in enumerate(TRAIN_TOPICS)
        for k in range(TEMPLATES_PER_TOPIC)
    ]
    train_prompts += TRAIN_QUESTIONS
    eval_prompts = [EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)].format(t) for i, t in enumerate(HELD_OUT_TOPICS)]
    eval_prompts += EXTRA_EVAL_PROMPTS
    answers = base_answers(
        model_dir, tok, train_prompts, args.answers or args.cache_dir / "demo_adapter_answers.json"
    )
    failed = []
    for index, name in enumerate(args.only or ADAPTERS):
        examples = build_examples(tok, train_prompts, answers, ADAPTERS[name][0])
        model, steps, (chat, raw, total) = train_adapter(
            model_dir, tok, name, examples, eval_prompts, args.seed + index
        )
        save_adapter(model, args.out / name)
        print(
            f"{name}: saved to {args.out / name} after {steps} steps; "
            f"held-out passes: chat {chat}/{total}, raw {raw}/{total}"
        )
        if chat < total or raw < total:
            failed.append(name)
    if failed:
        print(f"not every held-out prompt passes for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
