"""The router's tokenizer equals `AutoTokenizer(text).input_ids`; streaming decode matches a full decode."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from router.tokenizer import IncrementalDetokenizer, ModelTokenizer
from tests.router.conftest import build_tiny_tokenizer

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<s> literal special </s> tokens",
    "héllo wörld — 日本語 🎉🎉 ok",
    "tabs\tand\nnewlines\r\n",
    "x",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return ModelTokenizer.from_model_dir(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_equals_transformers(smollm2, text):
    ours, hf = smollm2
    assert ours.encode(text) == hf(text).input_ids


def test_smollm2_special_tokens_and_eos(smollm2):
    ours, hf = smollm2
    assert ours.eos_token_ids == {hf.eos_token_id}
    assert set(hf.all_special_ids) <= ours.special_ids
    assert ours.is_special(hf.eos_token_id) and not ours.is_special(hf("Hello").input_ids[0])


@pytest.mark.parametrize("bos_template", [True, False])
@pytest.mark.parametrize(
    "flags", [{}, {"add_bos_token": True, "add_eos_token": True}, {"add_bos_token": False}]
)
def test_special_token_handling_equals_transformers(tmp_path, bos_template, flags):
    """tokenizer.json's post-processor decides, not tokenizer_config's add_*_token (as in transformers 5)."""
    d = build_tiny_tokenizer(tmp_path, bos_template=bos_template, config=flags)
    ours, hf = ModelTokenizer.from_model_dir(d), AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
    assert ours.encode("ab")[0] == (1 if bos_template else ours.encode("a")[-1])


def test_named_special_token_missing_from_tokenizer_json_is_added(tmp_path):
    d = build_tiny_tokenizer(tmp_path, config={"pad_token": "<pad>"})
    ours, hf = ModelTokenizer.from_model_dir(d), AutoTokenizer.from_pretrained(d)
    assert ours.encode("a<pad>b") == hf("a<pad>b").input_ids
    assert ours.is_special(hf.pad_token_id)


def test_left_truncation_keeps_the_last_tokens(smollm2):
    ours, _ = smollm2
    text = "one two three four five six seven"
    full = ours.encode(text)
    assert ours.encode(text, truncate=3) == full[-3:]
    assert ours.encode(text, truncate=100) == full


def test_truncation_with_bos_equals_transformers(tiny_tokenizer_dir):
    ours = ModelTokenizer.from_model_dir(tiny_tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, truncation_side="left")
    for n in (1, 2, 5, 50):
        assert (
            ours.encode("abcdefghij", truncate=n) == hf("abcdefghij", truncation=True, max_length=n).input_ids
        )


def test_incremental_decode_matches_full_decode(smollm2):
    ours, hf = smollm2
    prompt = hf("Say:").input_ids
    generated = hf("héllo 日本 🎉🎉 ok<|im_end|>", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(ours, prompt)
    pieces = [detok.push(t) for t in generated]
    assert "" in pieces  # multi-byte characters span tokens: nothing until the character is complete
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == hf.decode(generated)


def test_flush_returns_incomplete_character(tiny_tokenizer_dir):
    tok = ModelTokenizer.from_model_dir(tiny_tokenizer_dir)
    ids = tok.encode("日", truncate=None)[1:]  # three byte tokens
    detok = IncrementalDetokenizer(tok, [1])
    assert [detok.push(i) for i in ids[:2]] == ["", ""]
    assert detok.flush() == "\ufffd"


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ModelTokenizer.from_model_dir(tmp_path)
