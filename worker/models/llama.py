"""Llama-family decoder (Llama, Mistral, Qwen2) composed from tensor-parallel layers.

The model never mentions ranks: the parallel layers own their sharding, and it only asks the context
how many heads this rank holds. Checkpoint names map to modules in `load`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.forward_batch import ForwardBatch
from worker.kv_cache import KVCache
from worker.layers.attention import PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding, apply_rotary
from worker.lora.sites import LoraSite
from worker.parallel import ParallelContext
from worker.weights import CheckpointWeights

# architecture -> whether q/k/v carry a bias. Anything else is refused by `model_class_for`.
ARCHITECTURES = {"LlamaForCausalLM": False, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}


def check_architecture(config) -> str:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise ValueError(
        f"model architecture {', '.join(archs) or '(none given)'} is not supported; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config) -> int | None:
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


class Attention(nn.Module):
    def __init__(
        self, config, ctx: ParallelContext, dtype, device, lora_layer, qkv_bias: bool, kernel, fused=None
    ):
        super().__init__()
        head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads // ctx.world_size
        self.num_kv_heads = ctx.kv_heads(config.num_key_value_heads)[1]
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            qkv_bias,
            ctx,
            dtype,
            device,
            lora_layer,
        )
        self.o_proj = RowParallelLinear(
            "o_proj",
            config.num_attention_heads * head_dim,
            config.hidden_size,
            False,
            ctx,
            dtype,
            device,
            lora_layer,
        )
        window = sliding_window_of(config)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim, window, kernel)
        self.rotate = apply_rotary if fused is None else fused.rotary

    def forward(self, x, cos, sin, key_cache, value_cache, batch: ForwardBatch):
        qkv = self.qkv_proj(x, batch.lora)  # [num_tokens, (H + 2 * H_kv) * D] on this rank
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = qkv.view(-1, heads + 2 * kv_heads, d)
        # q and k rotated in one go (they are neighbours in qkv): half the rotary ops of a layer.
        q, k = self.rotate(qkv[:, : heads + kv_heads], cos, sin).split([heads, kv_heads], dim=1)
        out = self.attn(q, k, qkv[:, heads + kv_heads :], key_cache, value_cache, batch)
        return self.o_proj(out, batch.lora)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config, ctx, dtype, device, lora_layer, fused=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, config.intermediate_size, ctx, dtype, device, lora_layer
        )
        self.down_proj = RowParallelLinear(
            "down_proj", config.intermediate_size, config.hidden_size, False, ctx, dtype, device, lora_layer
        )
        self.act = silu_and_mul if fused is None else fused.silu_mul

    def forward(self, x, lora):
        return self.down_proj(self.act(self.gate_up_proj(x, lora)), lora)


class DecoderLayer(nn.Module):
    def __init__(self, config, ctx, dtype, device, lora_layer, qkv_bias, attention_kernel, fused):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device, fused)
        self.self_attn = Attention(config, ctx, dtype, device, lora_layer, qkv_bias, attention_kernel, fused)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device, fused)
        self.mlp = MLP(config, ctx, dtype, device, lora_layer, fused)

    def forward(self, x, residual, cos, sin, key_cache, value_cache, batch):
        """The residual stream (HF's hidden states) is x + residual: the previous layer's output and the
        stream before it (residual None: x, the embeddings). Each norm adds its input into the stream."""
        h, residual = self.input_layernorm.add(x, residual)
        x = self.self_attn(h, cos, sin, key_cache, value_cache, batch)
        h, residual = self.post_attention_layernorm.add(x, residual)
        return self.mlp(h, batch.lora), residual

    def lora_sites(self) -> list[LoraSite]:
        linears = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        return [lin.lora_site for lin in linears if lin.lora_site is not None]


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config, ctx: ParallelContext, dtype, device, lora: bool, attention_kernel=None, fused_ops=None
    ):
        """attention_kernel: the native paged attention (`select_attention_kernel`), None for torch's.
        fused_ops: the native fused small ops (`select_fused_ops`: residual add + RMSNorm, SiLU and mul,
        rotary), None for torch's."""
        super().__init__()
        fused = fused_ops
        qkv_bias = ARCHITECTURES[check_architecture(config)]
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, ctx, dtype, device, i if lora else None, qkv_bias, attention_kernel, fused)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device, fused)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx, dtype, device)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), device, fused)

    def load(self, weights: CheckpointWeights) -> None:
        self.embed_tokens.load(weights, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            layer.input_layernorm.load(weights, f"{p}.input_layernorm.weight")
            layer.post_attention_layernorm.load(weights, f"{p}.post_attention_layernorm.weight")
            attn = f"{p}.self_attn"
            layer.self_attn.qkv_proj.load(weights, {m: f"{attn}.{m}" for m in ("q_proj", "k_proj", "v_proj")})
            layer.self_attn.o_proj.load(weights, f"{attn}.o_proj")
            mlp = f"{p}.mlp"
            layer.mlp.gate_up_proj.load(weights, {m: f"{mlp}.{m}" for m in ("gate_proj", "up_proj")})
            layer.mlp.down_proj.load(weights, f"{mlp}.down_proj")
        self.norm.load(weights, "model.norm.weight")
        tied = getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in weights
        self.lm_head.load(weights, "model.embed_tokens.weight" if tied else "lm_head.weight")

    def forward(self, token_ids: torch.Tensor, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """token_ids: [num_tokens] -> logits [len(batch.logits_indices), vocab] float32."""
        x, residual = self.embed_tokens(token_ids), None  # [num_tokens, hidden]
        cos, sin = self.rotary.cos_sin(batch.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, kv.key_caches[i], kv.value_caches[i], batch)
        rows = batch.logits_indices  # the last residual add, on the logits rows only
        x, _ = self.norm.add(x[rows], residual[rows])
        return self.lm_head(x)
