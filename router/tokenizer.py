"""The model's tokenizer in the router: encoding as `AutoTokenizer(text).input_ids`, streaming-safe decoding.

Encoding uses the `tokenizers` library on `tokenizer.json` the way transformers (v5, `TokenizersBackend`)
loads it: the file's post-processor decides which special tokens `tokenizer(text)` adds, and the
`add_bos_token`/`add_eos_token` keys of `tokenizer_config.json` are ignored when `tokenizer.json` exists
(transformers 5 drops them too; v4's LlamaTokenizerFast honoured them). Named special tokens of
`tokenizer_config.json` that `tokenizer.json` lacks are added, as transformers does. Model classes that
rebuild their pre-tokenizer in Python (Llama's Metaspace, CodeLlama) may differ in corner cases.

Decoding follows TGI's prefix/read offsets: a token's text is the text that appears once it is appended,
decoded together with a few tokens before it (so leading spaces and multi-byte characters come out right),
and is empty while the bytes so far end in an incomplete character.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Encoding, Tokenizer

# Tokens of context decoded before a new token (TGI uses the same 5).
PREFIX_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def _token_content(value: object) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class ModelTokenizer:
    """Encode prompts and decode tokens with a model directory's tokenizer."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int]):
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        processor = tokenizer.post_processor
        self._num_added = processor.num_special_tokens_to_add(False) if processor is not None else 0

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelTokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json (the router needs a fast tokenizer)")
        tok = Tokenizer.from_file(str(path))
        config = _read_json(model_dir / "tokenizer_config.json")
        named = {
            key: _token_content(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        missing = [t for t in named.values() if t is not None and tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        eos_ids = set()
        for name in ("generation_config.json", "config.json"):
            value = _read_json(model_dir / name).get("eos_token_id")
            eos_ids.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
        if named["eos_token"] is not None:
            eos_ids.add(tok.token_to_id(named["eos_token"]))
        return cls(tok, frozenset(eos_ids))

    def encode(self, text: str, truncate: int | None = None, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the model's special tokens; `truncate` keeps the last ones (TGI's left truncation).

        As in `tokenizers` truncation, the special tokens count towards `truncate` and are kept.
        `add_special_tokens=False` is for text that already holds them (a rendered chat template).
        """
        return self.encoding(text, truncate, add_special_tokens).ids

    def encoding(self, text: str, truncate: int | None = None, add_special_tokens: bool = True) -> Encoding:
        """`encode`'s result with its character offsets (`offsets`; special tokens have (0, 0))."""
        if truncate is None:
            return self._tok.encode(text, add_special_tokens=add_special_tokens)
        enc = self._tok.encode(text, add_special_tokens=False)
        keep = max(truncate - (self._num_added if add_special_tokens else 0), 0)
        if len(enc.ids) > keep:
            enc.truncate(keep, direction="left")
        return self._tok.post_process(enc) if add_special_tokens else enc

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token decoded on its own (TGI's text for prefill and top tokens)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


class IncrementalDetokenizer:
    """Per-sequence streaming decoder (TGI's prefix/read offsets over prompt + generated ids)."""

    def __init__(self, tokenizer: ModelTokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PREFIX_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Append a token and return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        prefix_len = self._read_offset - self._prefix_offset
        prefix_text = self._tokenizer.decode(window[:prefix_len])
        new_text = self._tokenizer.decode(window)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT_CHAR)):
            text = new_text[len(prefix_text) :]
            # Keep the window short: the old read offset becomes the new prefix start.
            del self._ids[: self._read_offset]
            self._read_offset = len(self._ids)
            self._prefix_offset = 0
            return text
        return ""
