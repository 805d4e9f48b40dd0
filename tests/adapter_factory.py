"""Reproducible random models and PEFT adapters for tests and benchmarks.

The adapters are written by peft itself (`save_pretrained`), so the files are exactly what users bring.
peft initialises B to zero; we overwrite A and B with seeded random values so an adapter changes logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(**overrides):
    """A small Llama config whose heads divide 1, 2 and 4 ranks, with an odd vocab and MLP size."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=251,
        hidden_size=64,
        intermediate_size=150,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_random_model(config, out_dir: Path, seed: int = 0, dtype=torch.float32) -> Path:
    """Write a random-weight HF model (config.json + model.safetensors) of `config` to `out_dir`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return out_dir


# What a tiny random model borrows from a real one so that the router can tokenize and render chats.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_chat_model(tokenizer_dir: Path, out: Path) -> Path:
    """The tiny test Llama (3 layers, hidden 64) with the vocabulary, tokenizer and chat template of the
    model in `tokenizer_dir` (SmolLM2: its ids 0/1/2, unk, bos and eos, match the tiny config's)."""
    save_random_model(tiny_llama_config(vocab_size=49152, max_position_embeddings=2048), out, seed=0)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def save_random_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    target_modules=ALL_TARGETS,
    layers_to_transform=None,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.1,
) -> Path:
    """Write a PEFT LoRA adapter for the model in `base_dir` with seeded random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        layers_to_transform=layers_to_transform,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(out_dir)
    return out_dir


def place_in_hf_cache(adapter_dir: Path, cache_dir: Path, repo_id: str, revision: str = "main") -> Path:
    """Put the files of `adapter_dir` into `cache_dir` as huggingface_hub caches a download of `repo_id`.

    The layout it writes: `models--org--name/blobs/<sha256>`, `snapshots/<commit>/<file>` symlinks to those
    blobs, `refs/<revision>` holding the commit. Returns the snapshot directory.
    """
    import hashlib

    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file())
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1("".join(sorted(digests.values())).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for path in files:
        blob = storage / "blobs" / digests[path.name]
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


def reseed_adapter(src_dir: Path, out_dir: Path, seed: int, std: float = 0.1) -> Path:
    """A copy of the PEFT adapter in `src_dir` (same config, same tensor names and shapes) with new seeded
    random weights: many distinct adapters for the price of one `save_random_adapter`."""
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True)
    shutil.copyfile(src_dir / "adapter_config.json", out_dir / "adapter_config.json")
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(src_dir / "adapter_model.safetensors")
    fresh = {
        key: (torch.randn(t.shape, generator=gen) * std).to(t.dtype) for key, t in sorted(tensors.items())
    }
    save_file(fresh, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return out_dir
