"""The chat template renders and tokenizes as transformers' `apply_chat_template`; sandbox and sources."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from router.chat_template import ChatTemplate, TemplateError, load
from router.tokenizer import ModelTokenizer
from tests.router.conftest import CHAT_TEMPLATE, build_tiny_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2? <|im_end|> <s> héllo 日本語 🎉"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3?\n"},
    ],
    [{"role": "user", "content": ""}],
]


def ours(model_dir, messages) -> list[int]:
    """What /v1/chat/completions sends to the workers for `messages`."""
    text = ChatTemplate.from_model_dir(model_dir).render(messages)
    return ModelTokenizer.from_model_dir(model_dir).encode(text, add_special_tokens=False)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_equals_transformers(smollm2_dir, messages):
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    rendered = ChatTemplate.from_model_dir(smollm2_dir).render(messages)
    assert rendered == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours(smollm2_dir, messages) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_that_writes_bos_equals_transformers(tmp_path, messages):
    """The tokenizer adds BOS and so does the template: transformers keeps one, and so must we."""
    d = build_tiny_tokenizer(tmp_path, config={"chat_template": CHAT_TEMPLATE})
    hf = AutoTokenizer.from_pretrained(d)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours(d, messages) == expected
    assert expected.count(1) == 1 + sum(m["content"].count("<s>") for m in messages)


def test_template_sources(tmp_path):
    d = build_tiny_tokenizer(tmp_path, config={"chat_template": "from config"})
    assert ChatTemplate.from_model_dir(d).render([]) == "from config"
    (d / "chat_template.jinja").write_text("from file")  # transformers 5: the file wins
    assert ChatTemplate.from_model_dir(d).render([]) == "from file"
    e = build_tiny_tokenizer(
        tmp_path / "named",
        config={
            "chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
        },
    )
    assert ChatTemplate.from_model_dir(e).render([]) == "d"
    f = build_tiny_tokenizer(tmp_path / "none")
    assert ChatTemplate.from_model_dir(f) is None
    with pytest.raises(TemplateError, match="no chat template") as info:
        load(str(f))
    assert info.value.status == 422 and info.value.error_type == "template_error"


def test_template_globals_filters_and_variables():
    source = (
        "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{{ add_generation_prompt }}|"
        "{{ tools is none }}|{% for m in messages %}{{ 'name' in m }}{% endfor %}|"
        "{% generation %}kept{% endgeneration %}|{{ strftime_now('%Y') | length }}"
    )
    t = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
    out = t.render([{"role": "user", "content": "<b>&é", "name": None}])
    msgs = json.dumps([{"role": "user", "content": "<b>&é"}], ensure_ascii=False)
    assert out == f"<s>|</s>|{msgs}|True|True|False|kept|4"


def test_trim_and_lstrip_blocks_like_transformers():
    source = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    assert ChatTemplate(source, {}).render([{"role": "user", "content": "a"}]) == "    a\n"


@pytest.mark.parametrize(
    "source, message",
    [
        ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{% set x = [] %}{{ x.append(1) }}", "unsafe"),
        ("{{ cycler.__init__.__globals__.os }}", "unsafe"),
    ],
)
def test_refusals_and_sandbox_are_template_errors(source, message):
    with pytest.raises(TemplateError, match=message) as info:
        ChatTemplate(source, {}).render([{"role": "user", "content": "x"}])
    assert info.value.status == 422
