"""Tests for lora_jax.data.tokenizers: byte tokenizer, tokenizer.json wrapper, get_tokenizer."""

import ast
import pathlib

import pytest
import tokenizers as hf

import lora_jax.data

from lora_jax.data.tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer


def _word_level_json(tmp_path, specials=("<pad>", "<s>", "</s>")):
    """Writes a WordLevel tokenizer.json over a few words plus `specials`; returns its path."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "lora": 3}
    tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.decoder = hf.decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(list(specials))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "LoRA: ΔW = BA ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)


def test_hf_tokenizer_finds_conventional_special_tokens(tmp_path):
    tok = HFTokenizer(_word_level_json(tmp_path))
    assert tok.encode("hello lora") == [1, 3]
    assert tok.decode([tok.bos_id, 1, 2, tok.eos_id]) == "hello world"
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (4, 5, 6)
    assert tok.vocab_size == 7


def test_hf_tokenizer_named_special_tokens(tmp_path):
    path = _word_level_json(tmp_path, specials=("[P]", "[B]", "[E]"))
    tok = HFTokenizer(path, pad_token="[P]", bos_token="[B]", eos_token="[E]")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (4, 5, 6)


def test_hf_tokenizer_missing_special_token_error_names_fix(tmp_path):
    path = _word_level_json(tmp_path, specials=("[P]",))
    with pytest.raises(ValueError, match=r"no pad token.*\[P\].*pad_token="):
        HFTokenizer(path)
    with pytest.raises(ValueError, match="no bos token.*'<nope>'"):
        HFTokenizer(path, pad_token="[P]", bos_token="<nope>")


def test_hf_tokenizer_trained_bpe(tmp_path):
    tok = hf.Tokenizer(hf.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["low rank adaptation", "lower ranks adapt"] * 20, trainer)
    path = tmp_path / "bpe.json"
    tok.save(str(path))
    wrapped = get_tokenizer(str(path))
    assert isinstance(wrapped, HFTokenizer)
    assert wrapped.pad_id == wrapped.bos_id == wrapped.eos_id == 1  # GPT-2 style
    assert wrapped.decode(wrapped.encode("low rank")) == "low rank"


def test_get_tokenizer_specs(tmp_path):
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="neither 'byte' nor an existing file"):
        get_tokenizer(str(tmp_path / "missing.json"))


def test_data_modules_import_no_jax_and_tokenizers_lazily():
    package = pathlib.Path(lora_jax.data.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top_level if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("jax", "flax", "tokenizers")], source
