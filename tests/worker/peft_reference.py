"""transformers + peft as the independent reference for the engine's distributions."""

from __future__ import annotations

from pathlib import Path

import torch


def load_peft_model(model_dir: Path, adapters: dict[str, Path], dtype=torch.float32, device="cpu"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@torch.no_grad()
def reference_logprobs(model, adapter: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: log-softmax of the next-token distribution before each generated token."""
    ids = torch.tensor([prompt + tokens[:-1]], device=model.device)
    logits = model(input_ids=ids, adapter_names=[adapter or "__base__"]).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 :], dim=-1).cpu()


def assert_matches_reference(records, model, atol: float) -> None:
    for rid, rec in records.items():
        ref = reference_logprobs(model, rec.adapter, rec.prompt, rec.tokens)
        ours = torch.stack(rec.logprobs)
        assert ours.shape == ref.shape, (rid, ours.shape, ref.shape)
        finite = torch.isfinite(ours)
        assert finite.all(), f"request {rid}: missing logprobs"
        diff = (ours - ref).abs().max().item()
        assert diff <= atol, f"request {rid} (adapter {rec.adapter}): max |logprob diff| {diff:.2e} > {atol}"
        assert rec.tokens == ref.argmax(-1).tolist(), (
            f"request {rid}: greedy tokens differ from the reference"
        )
