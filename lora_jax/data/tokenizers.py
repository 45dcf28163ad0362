"""Tokenizers with one small interface: a byte-level tokenizer and a tokenizer.json wrapper.

Both expose `encode(str) -> list[int]`, `decode(ids) -> str` and the integer attributes
`pad_id`, `bos_id`, `eos_id`, `vocab_size`; `get_tokenizer(spec)` builds one from a string
('byte' or a path to a Hugging Face `tokenizer.json`). Nothing here adds special tokens on its
own: callers place BOS/EOS/PAD explicitly (see `tasks.py` and `text.py`). The `tokenizers`
library is imported only when an `HFTokenizer` is built, so importing this module is cheap.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD=256, BOS=257, EOS=258 (vocab_size 259).

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi")
    [104, 105]
    >>> tok.decode([257, 104, 105, 258, 256])
    'hi'
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of `text` as ints, no special tokens added."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of the byte ids in `ids`; special ids (>= 256) are dropped."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Names tried, in order, when a special token is not named explicitly.
_DEFAULT_NAMES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>"),
    "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
}


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the `Tokenizer` interface.

    Special ids come from the token names given (`pad_token=`, `bos_token=`, `eos_token=`),
    else from the first of a few conventional names ('<pad>', '<s>', '</s>', '<|endoftext|>',
    ...) present in the vocabulary. `encode` never adds special tokens.

    Args:
        path: path to a `tokenizer.json` file.
        pad_token, bos_token, eos_token: optional token strings for the special ids.
    """

    def __init__(self, path: str, *, pad_token: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer file {path!r} does not exist; "
                "pass the path to a tokenizer.json, or 'byte'.")
        import tokenizers as hf_tokenizers  # pylint: disable=import-outside-toplevel
        self.path = path
        self._tok = hf_tokenizers.Tokenizer.from_file(path)
        self.pad_id = self._special_id("pad", pad_token)
        self.bos_id = self._special_id("bos", bos_token)
        self.eos_id = self._special_id("eos", eos_token)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def _special_id(self, kind: str, name: str | None) -> int:
        """Returns the id of the `kind` special token, named or found among the defaults."""
        candidates = (name,) if name is not None else _DEFAULT_NAMES[kind]
        for candidate in candidates:
            token_id = self._tok.token_to_id(candidate)
            if token_id is not None:
                return int(token_id)
        added = sorted(t.content for t in self._tok.get_added_tokens_decoder().values())
        tried = repr(name) if name is not None else f"any of {list(candidates)}"
        raise ValueError(
            f"{self.path}: no {kind} token found (tried {tried}); its added tokens are "
            f"{added}. Pass {kind}_token='<token>' naming a token in its vocabulary.")

    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text`, no special tokens added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids`, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def get_tokenizer(spec: str) -> Tokenizer:
    """Returns a tokenizer from a spec: 'byte' or a path to a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isfile(spec):
        return HFTokenizer(spec)
    raise ValueError(
        f"tokenizer spec {spec!r} is neither 'byte' nor an existing file; "
        "pass 'byte' or the path to a tokenizer.json.")
