"""The model's chat template, rendered the way transformers' `apply_chat_template` renders it.

Where the template comes from (transformers 5's order): `chat_template.jinja` in the model directory,
else `chat_template` in `tokenizer_config.json` (a string, or a list of `{name, template}` of which the
one named "default" is used).

Rendering matches `transformers.utils.chat_template_utils` as of transformers 5: a jinja2
`ImmutableSandboxedEnvironment` (chat templates come from model repositories and are untrusted code) with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block that renders
its body, a `tojson` filter that does not escape HTML, and the globals `raise_exception` and
`strftime_now`. The template sees `messages` (keys whose value is null dropped, as transformers drops
them), `tools` and `documents` (null), `add_generation_prompt` and the tokenizer's named special tokens
(`bos_token`, `eos_token`, `unk_token`, `pad_token`) as strings. The rendered text is then tokenized
without adding special tokens again (`apply_chat_template(tokenize=True)` calls the tokenizer with
`add_special_tokens=False`): the template already wrote them.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.errors import ApiError

_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TemplateError(ApiError):
    """No chat template, or the template refused the messages (TGI's `template_error`)."""

    status = 422
    error_type = "template_error"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text (training masks); here a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_content(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_source(model_dir: Path, config: dict) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str | None]):
        self.source = source
        self.special_tokens = special_tokens
        self._template = _environment().from_string(source)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The model's template, or None when it has none."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        source = _read_source(model_dir, config if isinstance(config, dict) else {})
        if source is None:
            return None
        return cls(source, {name: _token_content(config.get(name)) for name in _NAMED_TOKENS})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; a template that refuses them raises TemplateError (422)."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"Template error: {e}") from None


@functools.lru_cache(maxsize=8)
def load(model_dir: str) -> ChatTemplate:
    """The template of `model_dir`, read once; TemplateError if the model has none or it does not compile."""
    try:
        template = ChatTemplate.from_model_dir(model_dir)
    except jinja2.TemplateError as e:
        raise TemplateError(f"Template error: the model's chat template does not compile: {e}") from None
    if template is None:
        raise TemplateError(
            "Template error: the model has no chat template (chat_template.jinja or "
            "tokenizer_config.json `chat_template`); use /v1/completions or /generate"
        )
    return template
