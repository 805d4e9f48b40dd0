"""Tests for worker/lora/adapter.py: PEFT adapters load exactly as peft loads them, or are refused loudly.

The reference is peft itself: `PeftModel.from_pretrained` on the same files, compared module by module
(lora_A, lora_B and scaling). Bad adapters are made by editing a good one's files in a tmp dir.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.adapter_factory import ALL_TARGETS, tiny_llama_config
from worker.lora.adapter import (
    TARGET_MODULES,
    AdapterError,
    LoraAdapter,
    ModuleShape,
    load_peft_adapter,
)

NUM_LAYERS = 3
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def module_shapes(config) -> dict[str, ModuleShape]:
    """Full shapes of the base linear layers, computed from the HF config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": ModuleShape(h, q),
        "k_proj": ModuleShape(h, kv),
        "v_proj": ModuleShape(h, kv),
        "o_proj": ModuleShape(q, h),
        "gate_proj": ModuleShape(h, inter),
        "up_proj": ModuleShape(h, inter),
        "down_proj": ModuleShape(inter, h),
    }


SHAPES = module_shapes(tiny_llama_config())


def load(path: Path, name: str = "ad", num_layers: int = NUM_LAYERS, shapes=None) -> LoraAdapter:
    return load_peft_adapter(name, path, num_layers, shapes or SHAPES)


def save_peft_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """Like adapter_factory.save_random_adapter, but with any LoraConfig arguments."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora_kwargs)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def extra_adapters(tiny_model_dir, tmp_path_factory):
    """Adapters using config features the shared fixtures do not: patterns, regex targets, exclusions."""
    root = tmp_path_factory.mktemp("extra-adapters")
    specs = {
        "patterns": dict(
            r=4,
            lora_alpha=8,
            target_modules=list(ALL_TARGETS),
            rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
            alpha_pattern={r"model.layers.[02].self_attn.v_proj": 3, "up_proj": 16},
        ),
        "rs_patterns": dict(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["k_proj", "o_proj"],
            rank_pattern={"o_proj": 16},
        ),
        "regex_exclude": dict(
            r=4,
            lora_alpha=4,
            target_modules=r".*\.(k_proj|gate_proj)",
            exclude_modules=["model.layers.0.mlp.gate_proj"],
        ),
        "layers_int": dict(
            r=2,
            lora_alpha=5,
            target_modules=["q_proj", "up_proj"],
            layers_to_transform=2,
            layers_pattern="layers",
        ),
        "qualified": dict(
            r=3, lora_alpha=9, target_modules=["model.layers.0.self_attn.o_proj", "mlp.up_proj"]
        ),
    }
    return {
        name: save_peft_adapter(tiny_model_dir, root / name, seed=10 + i, **spec)
        for i, (name, spec) in enumerate(specs.items())
    }


def peft_reference(base_dir: Path, adapter_dir: Path) -> dict[tuple[int, str], tuple]:
    """(layer, module) -> (lora_A, lora_B, scaling) as peft loads the adapter onto the base."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    ref = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            match = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)", name)
            assert match, name
            ref[(int(match[1]), match[2])] = (
                module.lora_A["default"].weight.detach(),
                module.lora_B["default"].weight.detach(),
                module.scaling["default"],
            )
    return ref


def assert_matches_peft(adapter: LoraAdapter, ref: dict) -> None:
    assert set(adapter.weights) == set(ref)
    for key, (a, b, scaling) in ref.items():
        w = adapter.weights[key]
        assert w.a.dtype == w.b.dtype == torch.float32
        assert torch.equal(w.a, a), key
        assert torch.equal(w.b, b), key
        assert w.scale == pytest.approx(scaling, rel=1e-12), key
    assert adapter.lora_rank == max(a.shape[0] for a, _, _ in ref.values())
    assert adapter.target_modules == tuple(m for m in TARGET_MODULES if any(k[1] == m for k in ref))


@pytest.mark.parametrize("which", ["r4_qv", "r8_all", "r16_mlp", "r64_rs", "r8_layer1"])
def test_matches_peft(which, tiny_model_dir, tiny_adapters):
    adapter = load(tiny_adapters[which], name=which)
    assert_matches_peft(adapter, peft_reference(tiny_model_dir, tiny_adapters[which]))
    assert adapter.name == which and adapter.source == str(tiny_adapters[which])
    assert list(adapter.weights) == sorted(adapter.weights, key=lambda k: (k[0], TARGET_MODULES.index(k[1])))


@pytest.mark.parametrize("which", ["patterns", "rs_patterns", "regex_exclude", "layers_int", "qualified"])
def test_config_features_match_peft(which, tiny_model_dir, extra_adapters):
    assert_matches_peft(load(extra_adapters[which]), peft_reference(tiny_model_dir, extra_adapters[which]))


def test_fields_and_scales(tiny_adapters, extra_adapters):
    rs = load(tiny_adapters["r64_rs"])
    assert (rs.lora_rank, rs.alpha, rs.use_rslora) == (64, 16.0, True)
    assert all(w.scale == 16 / 8 for w in rs.weights.values())  # alpha / sqrt(64)
    part = load(tiny_adapters["r8_layer1"])
    assert set(part.weights) == {(1, "q_proj"), (1, "o_proj"), (1, "down_proj")}
    assert (
        part.target_modules == ("q_proj", "o_proj", "down_proj") and part.weights[(1, "q_proj")].scale == 2.0
    )
    pat = load(extra_adapters["patterns"])
    assert pat.lora_rank == 8 and pat.weights[(1, "down_proj")].a.shape == (2, 150)
    assert pat.weights[(1, "down_proj")].scale == 4.0 and pat.weights[(0, "q_proj")].scale == 1.0
    assert pat.weights[(2, "v_proj")].scale == 0.75 and pat.weights[(1, "v_proj")].scale == 2.0
    assert pat.weights[(0, "up_proj")].scale == 4.0
    assert load(extra_adapters["rs_patterns"]).weights[(0, "o_proj")].scale == 6 / 4


# --- helpers to craft bad adapters -------------------------------------------------------------------


def clone(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "bad"))


def edit_config(path: Path, **changes) -> Path:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return path


def edit_tensors(path: Path, edit) -> Path:
    tensors = load_file(path / "adapter_model.safetensors")
    tensors = edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def refused(path: Path, *fragments: str, name: str = "bad-ad", **kwargs) -> str:
    with pytest.raises(AdapterError) as info:
        load(path, name=name, **kwargs)
    message = str(info.value)
    assert message.startswith(f"adapter {name!r}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def qv(tiny_adapters, tmp_path) -> Path:
    """A writable copy of r4_qv: r=4, alpha=8, q_proj + v_proj on all three layers."""
    return clone(tiny_adapters["r4_qv"], tmp_path)


# --- tolerated variations ----------------------------------------------------------------------------


def test_adapter_name_segment_in_keys_is_tolerated(qv, tiny_adapters):
    edit_tensors(qv, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    renamed, original = load(qv), load(tiny_adapters["r4_qv"])
    assert set(renamed.weights) == set(original.weights)
    assert all(torch.equal(renamed.weights[k].b, w.b) for k, w in original.weights.items())


def test_harmless_unknown_fields_are_ignored(qv, tiny_adapters):
    edit_config(qv, some_future_field={"x": 1}, lora_dropout=0.5, base_model_name_or_path="other/model")
    edit_config(qv, velora_config={"num_groups": 4}, task_type=None, init_lora_weights="gaussian")
    assert load(qv).weights.keys() == load(tiny_adapters["r4_qv"]).weights.keys()


@pytest.mark.parametrize(
    ("which", "changes", "count"),
    [
        ("r4_qv", dict(target_modules=None), NUM_LAYERS * 2),  # peft's default for Llama: q_proj, v_proj
        ("r8_all", dict(target_modules="all-linear"), NUM_LAYERS * 7),
        ("r8_all", dict(target_modules="ALL-LINEAR"), NUM_LAYERS * 7),
        ("r8_layer1", dict(target_modules="all-linear", layers_to_transform=None), None),
    ],
)
def test_peft_default_and_shorthand_targets(which, changes, count, tiny_adapters, tmp_path):
    path = edit_config(clone(tiny_adapters[which], tmp_path), **changes)
    if count is None:  # all-linear targets every layer, but the file only has layer 1
        refused(path, "targets model.layers.0.", "no weights")
    else:
        assert len(load(path).weights) == count


# --- refusals: files ---------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    refused(tmp_path / "nope", "nope", "not a directory")


def test_path_is_a_file(tiny_adapters):
    refused(tiny_adapters["r4_qv"] / "adapter_config.json", "adapter_config.json", "not a directory")


def test_missing_config(qv):
    (qv / "adapter_config.json").unlink()
    refused(qv, "no adapter_config.json")


def test_invalid_json(qv):
    (qv / "adapter_config.json").write_text('{"r": 4,')
    refused(qv, "adapter_config.json is not valid JSON")


def test_missing_safetensors(qv):
    (qv / "adapter_model.safetensors").unlink()
    refused(qv, "no adapter_model.safetensors")


def test_pickle_checkpoint_is_not_loaded(qv):
    (qv / "adapter_model.safetensors").rename(qv / "adapter_model.bin")
    refused(qv, "adapter_model.bin", "pickle", "save_file(torch.load(")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(damage, qv):
    weights = qv / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00\xff not safetensors" * 9 if damage == "garbage" else data[: len(data) - 100])
    refused(qv, "adapter_model.safetensors is corrupt")


# --- refusals: config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        (dict(peft_type="IA3"), ["peft_type='IA3'", "only LORA"]),
        (dict(target_modules=["c_attn"]), ["'c_attn'", "matches no module", "q_proj"]),
        (dict(target_modules=["q_proj", "v_proj", "W_pack"]), ["'W_pack'", "matches no module"]),
        (dict(target_modules=["q_proj", "v_proj", "model.layers.7.mlp.up_proj"]), ["layers.7.mlp.up_proj"]),
        (dict(target_modules=r".*\.c_(attn|proj)"), [r".*\\.c_(attn|proj)", "matches no module"]),
        (dict(target_modules="[unclosed"), ["invalid regular expression", "[unclosed"]),
        (dict(target_modules=5), ["target_modules=5"]),
        (dict(layers_to_transform=[0, 1, 2], layers_pattern="h"), ["matches no module", "layers_pattern"]),
        (dict(layers_to_transform="1"), ["layers_to_transform='1'"]),
        (dict(use_dora=True), ["use_dora=True", "DoRA", "supported: "]),
        (dict(modules_to_save=["lm_head"]), ["modules_to_save", "not supported"]),
        (dict(target_modules=["q_proj", "v_proj", "embed_tokens"]), ["'embed_tokens'", "not supported"]),
        (
            dict(target_modules=["q_proj", "v_proj", "model.embed_tokens"]),
            ["'model.embed_tokens'", "embed_tokens"],
        ),
        (dict(target_modules=["q_proj", "v_proj", "lm_head"]), ["'lm_head'", "not supported"]),
        (dict(target_modules=r".*(q_proj|v_proj|lm_head)"), ["'lm_head'", "not supported"]),
        (dict(bias="all"), ["bias='all'", "only 'none'"]),
        (dict(bias="lora_only"), ["bias='lora_only'"]),
        (dict(lora_bias=True), ["lora_bias=True"]),
        (dict(fan_in_fan_out=True), ["fan_in_fan_out=True", "not supported"]),
        (
            dict(init_lora_weights="pissa_niter_4"),
            ["pissa_niter_4", "path_initial_model_for_weight_conversion"],
        ),
        (dict(use_qalora=True), ["use_qalora"]),
        (dict(layer_replication=[[0, 2]]), ["layer_replication"]),
        (dict(trainable_token_indices=[1, 2]), ["trainable_token_indices"]),
        (dict(target_parameters=["mlp.experts.gate_up_proj"]), ["target_parameters"]),
        (dict(alora_invocation_tokens=[5, 6]), ["alora_invocation_tokens"]),
        (dict(target_modules=".*q_proj", layers_to_transform=[1]), ["need target_modules as a list"]),
        (dict(layers_pattern="layers"), ["layers_pattern='layers' needs layers_to_transform"]),
        (dict(use_rslora="yes"), ["use_rslora='yes'"]),
        (dict(r=0), ["r=0"]),
        (dict(r=True), ["r=True"]),
        (dict(lora_alpha=None), ["lora_alpha=None"]),
        (dict(rank_pattern={"q_proj": -1}), ["rank_pattern"]),
        (dict(alpha_pattern={"q_proj": "big"}), ["alpha_pattern"]),
        (dict(rank_pattern={"q_proj(": 4}), ["rank_pattern key 'q_proj('", "regular expression"]),
    ],
)
def test_config_refusals(changes, fragments, qv):
    refused(edit_config(qv, **changes), *fragments)


def test_rank_disagrees_with_config(qv):
    refused(edit_config(qv, r=8), f"{Q0}.lora_A.weight", "[4, 64]", "[8, 64]")


def test_rank_pattern_disagrees_with_file(qv):
    refused(
        edit_config(qv, rank_pattern={r"layers\.2\.self_attn\.v_proj": 2}),
        "layers.2.self_attn.v_proj",
        "[2, 64]",
    )


def test_tensor_for_untargeted_module(qv):
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    refused(edit_config(qv, target_modules=["q_proj"]), key, "does not target")


def test_tensor_for_untargeted_layer(qv):
    refused(edit_config(qv, layers_to_transform=[0]), "layers.1.", "does not target")


def test_targeted_module_without_weights(qv):
    refused(
        edit_config(qv, target_modules=["q_proj", "v_proj", "k_proj"]),
        "layers.0.self_attn.k_proj",
        "no weights",
    )


# --- refusals: tensors -------------------------------------------------------------------------------


def rename(old: str, new: str):
    return lambda t: {new if k == old else k: v for k, v in t.items()}


def add(key: str, value: torch.Tensor):
    return lambda t: {**t, key: value}


def test_unmappable_key(qv):
    bad = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
    refused(edit_tensors(qv, rename(f"{Q0}.lora_A.weight", bad)), bad, "does not map", "self_attn.q_proj")


def test_module_under_wrong_parent(qv):
    bad = "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"
    refused(edit_tensors(qv, rename(f"{Q0}.lora_A.weight", bad)), bad, "does not map")


def test_non_lora_tensor_next_to_lora_tensors(qv):
    bad = "base_model.model.lm_head.weight"
    refused(edit_tensors(qv, add(bad, torch.zeros(251, 64))), bad, "does not map")


def test_shape_mismatch_in_file(qv):
    key = f"{Q0}.lora_A.weight"
    refused(edit_tensors(qv, add(key, torch.zeros(4, 128))), key, "expected [4, 64]", "shape [4, 128]")


def test_adapter_for_another_base(tiny_adapters):
    other = module_shapes(tiny_llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2))
    refused(tiny_adapters["r4_qv"], "lora_A.weight", "expected [4, 128]", "shape [4, 64]", shapes=other)


def test_layer_index_out_of_range(qv):
    bad = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    refused(edit_tensors(qv, rename(f"{Q0}.lora_A.weight", bad)), bad, "layer 7", "3 layers")


def test_base_with_fewer_layers(tiny_adapters):
    refused(tiny_adapters["r4_qv"], "layers.2.self_attn", "2 layers", num_layers=2)


@pytest.mark.parametrize(("drop", "missing"), [("lora_B", "lora_A"), ("lora_A", "lora_B")])
def test_half_pair(drop, missing, qv):
    edit_tensors(qv, lambda t: {k: v for k, v in t.items() if k != f"{Q0}.{drop}.weight"})
    refused(qv, f"{Q0}.{missing}.weight", f"no matching {drop}")


def test_duplicate_adapter_name_segments(qv):
    tensors = load_file(qv / "adapter_model.safetensors")
    edit_tensors(qv, add(f"{Q0}.lora_A.default.weight", tensors[f"{Q0}.lora_A.weight"].clone()))
    refused(qv, f"{Q0}.lora_A.weight", f"{Q0}.lora_A.default.weight", "both lora_A")


@pytest.mark.parametrize(
    ("key", "shape", "fragment"),
    [
        (f"{Q0}.lora_magnitude_vector", (64,), "DoRA"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 251), "embedding LoRA"),
        (f"{Q0}.lora_B.bias", (64,), "LoRA biases are not supported"),
    ],
)
def test_unsupported_tensor_kinds(key, shape, fragment, qv):
    refused(edit_tensors(qv, add(key, torch.zeros(shape))), key, fragment)


def test_dora_config_and_keys(tiny_model_dir, tmp_path):
    dora = save_peft_adapter(
        tiny_model_dir, tmp_path / "dora", seed=0, r=4, target_modules=["q_proj"], use_dora=True
    )
    refused(dora, "use_dora=True", "DoRA")
    edit_config(dora, use_dora=False)
    refused(dora, "lora_magnitude_vector", "DoRA")


def test_empty_file(qv):
    refused(edit_tensors(qv, lambda t: {}), "no LoRA tensors", "empty")


def test_file_without_lora_tensors(qv):
    refused(
        edit_tensors(qv, lambda t: {"base_model.model.lm_head.weight": torch.zeros(3)}),
        "no LoRA tensors",
        "lm_head",
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(torch.full((4, 64), float("nan")), "NaN"), (torch.zeros(4, 64, dtype=torch.int8), "dtype")],
)
def test_bad_values(value, fragment, qv):
    refused(edit_tensors(qv, add(f"{Q0}.lora_A.weight", value)), f"{Q0}.lora_A.weight", fragment)


def test_half_precision_file_is_upcast(qv, tiny_adapters):
    edit_tensors(qv, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    adapter, original = load(qv), load(tiny_adapters["r4_qv"])
    for key, w in adapter.weights.items():
        assert w.a.dtype == torch.float32
        assert torch.equal(w.a, original.weights[key].a.to(torch.bfloat16).float())


def test_bad_base_description_is_a_caller_error(tiny_adapters):
    with pytest.raises(ValueError, match="c_attn"):
        load_peft_adapter("ad", tiny_adapters["r4_qv"], NUM_LAYERS, {**SHAPES, "c_attn": ModuleShape(1, 1)})
