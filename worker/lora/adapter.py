"""Load and validate a PEFT LoRA adapter from a local directory into plain float32 tensors.

Every tensor in `adapter_model.safetensors` is either used or refused, every module the config targets
must have weights, and every PEFT feature we cannot serve exactly is refused with an `AdapterError`
naming the adapter and the offending key, field or shape. Nothing is silently dropped or defaulted.

Config matching follows peft 0.21 (`check_target_module_exists`, `get_pattern_key`): module keys are
the base model's module names, e.g. `model.layers.3.self_attn.q_proj`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {m: "self_attn" if m in TARGET_MODULES[:4] else "mlp" for m in TARGET_MODULES}
_UNSUPPORTED_TARGETS = ("model.embed_tokens", "lm_head")
_SUPPORTED = "LoRA on self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj"
_NO_EMBEDDING = f"LoRA on embed_tokens / lm_head is not supported; supported: {_SUPPORTED}"
_EXAMPLE_KEY = "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"
_KEY_RE = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight"
)
# Truthy config fields that change what the adapter computes, with why we refuse them.
_REFUSED_FIELDS = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported; merge it into the base or retrain as LoRA",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style transposed weights) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "lora_bias": "LoRA bias (lora_bias=true) is not supported",
    "trainable_token_indices": "trainable_token_indices (embedding updates) is not supported",
    "layer_replication": "layer_replication (changes the base model's layers) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values whose unconverted adapters only work on a modified base model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class ModuleShape:
    """Full (unsharded) shape of a base linear layer: y = x @ W.T with W: [h_out, h_in]."""

    h_in: int
    h_out: int


@dataclass(frozen=True)
class LoraWeight:
    """One module's LoRA factors: delta(x) = scale * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [r, h_in] float32 (peft's lora_A.weight)
    b: torch.Tensor  # [h_out, r] float32 (peft's lora_B.weight), not scaled
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA, with per-module r and alpha


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter: per-(layer, module) weights for the base it was checked against."""

    name: str
    source: str
    lora_rank: int  # max r over its modules
    alpha: float  # config lora_alpha
    use_rslora: bool
    target_modules: tuple[str, ...]  # subset of TARGET_MODULES, in that order
    weights: dict[tuple[int, str], LoraWeight]


class AdapterError(ValueError):
    """An adapter cannot be served; the message starts with "adapter '<name>':"."""


@dataclass(frozen=True)
class _Config:
    r: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...]
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def load_peft_adapter(
    name: str, path: Path, num_layers: int, module_shapes: dict[str, ModuleShape]
) -> LoraAdapter:
    """Load the PEFT LoRA adapter in directory `path` for a base with `num_layers` layers.

    `module_shapes` maps each base module name (a subset of TARGET_MODULES) to its full shape; modules
    missing from it do not exist in the base. Raises AdapterError for anything we cannot serve exactly.
    """
    unknown = set(module_shapes) - set(TARGET_MODULES)
    if unknown or num_layers < 1:
        raise ValueError(f"bad base description: num_layers={num_layers}, unknown modules {sorted(unknown)}")
    path = Path(path)
    raw, weights_file = _read_files(name, path)
    cfg = _parse_config(name, raw)
    targeted = _targeted_modules(name, cfg, num_layers, module_shapes)
    pairs = _pair_tensors(name, _read_tensors(name, weights_file), num_layers, module_shapes, targeted)
    weights = {}
    for (layer, module), (a_key, a, b_key, b) in sorted(pairs.items(), key=_order):
        key = f"model.layers.{layer}.{_PARENT[module]}.{module}"
        r = _pattern_value(cfg.rank_pattern, key, cfg.r)
        alpha = _pattern_value(cfg.alpha_pattern, key, cfg.alpha)
        shape = module_shapes[module]
        _check_shape(name, a_key, a, (r, shape.h_in), module)
        _check_shape(name, b_key, b, (shape.h_out, r), module)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        weights[(layer, module)] = LoraWeight(a=a, b=b, scale=float(scale))
    touched = {m for _, m in weights}
    return LoraAdapter(
        name=name,
        source=str(path),
        lora_rank=max(w.a.shape[0] for w in weights.values()),
        alpha=cfg.alpha,
        use_rslora=cfg.use_rslora,
        target_modules=tuple(m for m in TARGET_MODULES if m in touched),
        weights=weights,
    )


def _order(item) -> tuple[int, int]:
    (layer, module), _ = item
    return layer, TARGET_MODULES.index(module)


def _read_files(name: str, path: Path) -> tuple[dict, Path]:
    """Check the directory layout and parse adapter_config.json."""
    if not path.is_dir():
        raise AdapterError(
            f"adapter {name!r}: {str(path)!r} is not a directory (expected a PEFT adapter dir)"
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: no adapter_config.json in {str(path)!r}")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                f"adapter {name!r}: only adapter_model.bin found in {str(path)!r}; pickle checkpoints are "
                'not loaded (they can run code). Convert once with: python -c "import torch; from '
                "safetensors.torch import save_file; save_file(torch.load('adapter_model.bin', "
                "weights_only=True), 'adapter_model.safetensors')\""
            )
        raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors in {str(path)!r}")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json must hold a JSON object")
    return raw, weights_file


def _parse_config(name: str, raw: dict) -> _Config:
    """Validate the config fields we use and refuse the ones that change what the adapter computes."""
    err = f"adapter {name!r}: adapter_config.json"
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{err} has peft_type={raw.get('peft_type')!r}; only LORA adapters are supported")
    for field, why in _REFUSED_FIELDS.items():
        if raw.get(field):
            raise AdapterError(f"{err}: {field}={raw[field]!r}: {why}; supported: {_SUPPORTED}")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"{err}: bias={raw['bias']!r} is not supported (only 'none'); {_SUPPORTED}")
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MODIFYING_INITS):
        raise AdapterError(
            f"{err}: init_lora_weights={init!r} adapters need a modified base model; save them with peft's "
            "path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not _is_int(r) or r < 1:
        raise AdapterError(f"{err}: r={r!r} must be a positive integer")
    if not _is_number(alpha):
        raise AdapterError(f"{err}: lora_alpha={alpha!r} must be a number")
    rank_pattern = _patterns(err, "rank_pattern", raw, lambda v: _is_int(v) and v > 0, "positive integers")
    alpha_pattern = _patterns(err, "alpha_pattern", raw, _is_number, "numbers")
    layers = raw.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i) for i in layers)):
        raise AdapterError(f"{err}: layers_to_transform={layers!r} must be an integer or a list of integers")
    target, pattern = raw.get("target_modules"), raw.get("layers_pattern")
    if isinstance(target, str) and (layers is not None or pattern is not None):
        raise AdapterError(
            f"{err}: layers_to_transform / layers_pattern need target_modules as a list (peft)"
        )
    if pattern and not layers:
        raise AdapterError(f"{err}: layers_pattern={pattern!r} needs layers_to_transform (peft)")
    if not isinstance(raw.get("use_rslora", False), bool):
        raise AdapterError(f"{err}: use_rslora={raw['use_rslora']!r} must be true or false")
    return _Config(
        r=r,
        alpha=float(alpha),
        use_rslora=raw.get("use_rslora", False),
        # peft fills a missing target_modules from its per-architecture default: q_proj, v_proj for Llama.
        target_modules=_names(err, "target_modules", target if target is not None else ["q_proj", "v_proj"]),
        exclude_modules=_names(err, "exclude_modules", raw.get("exclude_modules") or []),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=_names(
            err, "layers_pattern", [pattern] if isinstance(pattern, str) else pattern or []
        ),
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _patterns(err: str, field: str, raw: dict, valid, kind: str) -> dict:
    """A rank_pattern / alpha_pattern dict: regex keys (as peft get_pattern_key uses them), checked values."""
    value = raw.get(field) or {}
    if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
        raise AdapterError(f"{err}: {field}={value!r} must map patterns to {kind}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(
                f"{err}: {field} key {pattern!r} is not a valid regular expression: {e}"
            ) from e
    return value


def _names(err: str, field: str, value) -> str | tuple[str, ...]:
    """A regex string or a tuple of names, as peft accepts for target_modules and friends."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{err}: {field}={value!r} must be a string (regex) or a list of strings")


def _targeted_modules(
    name: str, cfg: _Config, num_layers: int, module_shapes: dict[str, ModuleShape]
) -> set[tuple[int, str]]:
    """The (layer, module) pairs the config adapts in this base; refuse targets we cannot serve."""
    err = f"adapter {name!r}: adapter_config.json"
    keys = {
        f"model.layers.{i}.{_PARENT[m]}.{m}": (i, m)
        for i in range(num_layers)
        for m in TARGET_MODULES
        if m in module_shapes
    }
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        # peft's shorthand for every linear layer except the output layer
        cfg = replace(cfg, target_modules=tuple(module_shapes))
    try:
        if isinstance(cfg.target_modules, tuple):
            for entry in cfg.target_modules:
                if any(k == entry or k.endswith(f".{entry}") for k in _UNSUPPORTED_TARGETS):
                    raise AdapterError(f"{err}: target_modules entry {entry!r}: {_NO_EMBEDDING}")
                if not any(k == entry or k.endswith(f".{entry}") for k in keys):
                    raise AdapterError(
                        f"{err}: target_modules entry {entry!r} matches no module of the base model; "
                        f"supported modules: {', '.join(module_shapes)}"
                    )
        for key in _UNSUPPORTED_TARGETS:
            if _targets(cfg, key):
                raise AdapterError(
                    f"{err}: target_modules={cfg.target_modules!r} matches {key!r}: {_NO_EMBEDDING}"
                )
        targeted = {im for key, im in keys.items() if _targets(cfg, key)}
    except re.error as e:
        raise AdapterError(f"{err}: invalid regular expression {e.pattern!r}: {e}") from e
    if not targeted:
        raise AdapterError(
            f"{err}: target_modules={cfg.target_modules!r} (layers_to_transform={cfg.layers_to_transform}, "
            f"layers_pattern={cfg.layers_pattern}) matches no module of this {num_layers}-layer base; "
            f"supported modules: {', '.join(module_shapes)}"
        )
    return targeted


def _targets(cfg: _Config, key: str) -> bool:
    """peft's check_target_module_exists for module name `key`."""
    ex = cfg.exclude_modules
    if re.fullmatch(ex, key) if isinstance(ex, str) else any(key == e or key.endswith(f".{e}") for e in ex):
        return False
    if isinstance(cfg.target_modules, str):
        return re.fullmatch(cfg.target_modules, key) is not None
    if key in cfg.target_modules:
        return True
    if not any(key.endswith(f".{t}") for t in cfg.target_modules):
        return False
    if cfg.layers_to_transform is None:
        return True
    if not cfg.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in cfg.layers_pattern)
        match = next((m for m in patterns if m is not None), None)
    return match is not None and int(match["idx"]) in cfg.layers_to_transform


def _pattern_value(patterns: dict, key: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of `key` at a name boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_tensors(name: str, weights_file: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the file, as float32; refuse corrupt files and non-float or non-finite data."""
    try:
        with safe_open(weights_file, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(
            f"adapter {name!r}: adapter_model.safetensors is corrupt or unreadable: {e}"
        ) from e
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} has dtype {t.dtype}; expected floating point"
            )
        if not torch.isfinite(t).all():
            raise AdapterError(f"adapter {name!r}: tensor {key!r} contains NaN or Inf values")
        tensors[key] = t.to(torch.float32).contiguous()
    return tensors


def _pair_tensors(
    name: str,
    tensors: dict[str, torch.Tensor],
    num_layers: int,
    module_shapes: dict[str, ModuleShape],
    targeted: set[tuple[int, str]],
) -> dict[tuple[int, str], tuple[str, torch.Tensor, str, torch.Tensor]]:
    """Map every tensor to its (layer, module) A or B; refuse leftovers, gaps and half pairs."""
    err = f"adapter {name!r}:"
    _refuse_unsupported_keys(name, tensors)
    if not any(".lora_A." in k or ".lora_B." in k for k in tensors):
        listing = f"its keys are {sorted(tensors)[:5]}" if tensors else "it is empty"
        raise AdapterError(f"{err} adapter_model.safetensors contains no LoRA tensors ({listing})")
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in tensors:
        match = _KEY_RE.fullmatch(key)
        if match is None or match[3] not in module_shapes or _PARENT[match[3]] != match[2]:
            raise AdapterError(
                f"{err} tensor {key!r} does not map to a LoRA weight of a base module; expected keys like "
                f"{_EXAMPLE_KEY!r} ({_SUPPORTED}, base modules: {', '.join(module_shapes)})"
            )
        layer, module, ab = int(match[1]), match[3], match[4]
        if layer >= num_layers:
            raise AdapterError(
                f"{err} tensor {key!r} is for layer {layer} but the base has {num_layers} layers"
            )
        if (layer, module) not in targeted:
            raise AdapterError(
                f"{err} tensor {key!r} is for a module adapter_config.json does not target "
                "(check target_modules, layers_to_transform, exclude_modules)"
            )
        pair = found.setdefault((layer, module), {})
        if ab in pair:
            raise AdapterError(f"{err} tensors {pair[ab]!r} and {key!r} are both lora_{ab} of one module")
        pair[ab] = key
    for pair in found.values():
        if len(pair) == 1:
            (ab, key), other = next(iter(pair.items())), "B" if "A" in pair else "A"
            raise AdapterError(f"{err} tensor {key!r} has no matching lora_{other} tensor")
    missing = sorted(targeted - found.keys())
    if missing:
        layer, module = missing[0]
        raise AdapterError(
            f"{err} adapter_config.json targets model.layers.{layer}.{_PARENT[module]}.{module} "
            f"({len(missing)} modules in all) but adapter_model.safetensors has no weights for it"
        )
    return {im: (p["A"], tensors[p["A"]], p["B"], tensors[p["B"]]) for im, p in found.items()}


def _refuse_unsupported_keys(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Name the PEFT feature behind keys we recognise but cannot serve."""
    for key in tensors:
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
        if "lora_embedding_" in key:
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} is an embedding LoRA; only {_SUPPORTED} is supported"
            )
        if key.endswith(".bias"):
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is a bias; LoRA biases are not supported")


def _check_shape(name: str, key: str, t: torch.Tensor, expected: tuple[int, int], module: str) -> None:
    if tuple(t.shape) != expected:
        raise AdapterError(
            f"adapter {name!r}: tensor {key!r} has shape {list(t.shape)}, expected {list(expected)} "
            f"(base {module} and r from adapter_config.json); is the adapter for another base model?"
        )
