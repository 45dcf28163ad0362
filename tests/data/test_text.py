"""Tests for lora_jax.data.text: plain text and JSONL loading, packing, host sharding."""

import itertools
import json

import numpy as np
import pytest
import tokenizers as hf

from lora_jax.data.text import PIECE_BYTES, load_jsonl, load_text
from lora_jax.data.tokenizers import ByteTokenizer, HFTokenizer

TOK = ByteTokenizer()
MARK = 259  # outside the byte tokenizer's vocabulary


class MarkingTokenizer(ByteTokenizer):
    """Bytes after a MARK at the start of every `encode` call, as a sentencepiece tokenizer
    marks the start of each text it is given: the stream shows where the pieces are."""

    def encode(self, text):
        return [MARK] + super().encode(text)


def _stream(data):
    """The token stream of `load_text`'s rows (every row's inputs, then the last target)."""
    real = data["segment_ids"] > 0
    return np.append(data["inputs"][real], data["targets"][real][-1]).tolist()


def _pieces(path, k):
    """(start byte, bytes) of each piece of the one-document file `path` (MarkingTokenizer)."""
    stream = _stream(load_text(str(path), MarkingTokenizer(), seq_len=16, piece_bytes=k))
    assert stream[0] == MARK and stream[-1] == TOK.eos_id
    marks = [i for i, t in enumerate(stream) if t == MARK] + [len(stream) - 1]
    pieces = [bytes(stream[i + 1:j]) for i, j in itertools.pairwise(marks)]
    return list(zip(np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist(), pieces))


def _write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return str(path)


def test_load_text_packs_stream_with_every_token_but_a_documents_first_a_target_once(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("low rank")
    data = load_text([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], TOK, seq_len=8)
    a = TOK.encode("hello world") + [TOK.eos_id]
    b = TOK.encode("low rank") + [TOK.eos_id]
    assert data["inputs"].shape == (3, 8)  # ceil((21 - 1) / 8)
    targets = data["targets"][data["loss_mask"] > 0]
    np.testing.assert_array_equal(targets, a[1:] + b[1:])  # b[0]: nothing of b precedes it
    np.testing.assert_array_equal(data["inputs"][0], a[:8])
    np.testing.assert_array_equal(data["segment_ids"],
                                  [[1] * 8, [1] * 4 + [2] * 4, [1] * 4 + [0] * 4])
    assert (data["task_ids"] == 0).all() and data["loss_mask"].sum() == 19
    assert (data["targets"][data["loss_mask"] == 0] != TOK.pad_id).sum() == 1  # b[0] only


def test_a_document_of_one_piece_is_tokenised_whole_as_before(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("first line é\r\n  second\rthird\n\n".encode() * 100)  # CRLF, CR
    text = path.read_text(encoding="utf-8")  # how a text file was read (universal newlines)
    tok = MarkingTokenizer()
    assert len(path.read_bytes()) <= PIECE_BYTES
    assert _stream(load_text(str(path), tok, seq_len=16)) == tok.encode(text) + [tok.eos_id]
    k = len(path.read_bytes())  # exactly one piece's size: still one piece
    assert _stream(load_text(str(path), tok, seq_len=16, piece_bytes=k)) == \
        tok.encode(text) + [tok.eos_id]


def _line_start(data, c):
    """Whether byte c of `data` starts a line that begins with a non-space, after a line that
    ends in a non-space."""
    return c < len(data) and data[c - 1:c] == b"\n" and data[c] not in b" \n" \
        and data[c - 2] not in b" \n"


def test_pieces_start_at_line_starts_else_words_else_characters(tmp_path):
    """Piece m (m >= 1) starts at the first line start at or after byte m·K that follows a line
    ending in a non-space and begins with one; in a line longer than a piece, before a space
    between two words; else at a character (never inside one, nor inside a CRLF)."""
    k, rng = 32, np.random.default_rng(0)
    lines = ["".join(rng.choice(list("ab c"), int(rng.integers(0, 12)))) for _ in range(80)]
    docs = {"lines": "\n".join(lines) + "\n", "words": "abc de fgh  ij " * 30,
            "chars": "é漢x" * 40, "crlf": "\r\n" * 70}
    at_lines = 0
    for name, text in docs.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(text.encode())
        data = path.read_bytes()
        pieces = _pieces(path, k)
        joined = b"".join(p for _, p in pieces)
        assert joined == path.read_text(encoding="utf-8").encode(), name  # nothing lost
        assert len(pieces) == -(-len(data) // k), name
        for m, (start, piece) in enumerate(pieces[1:] if name != "crlf" else [], start=1):
            assert m * k <= start < (m + 1) * k, (name, m, start)
            piece.decode("utf-8")  # whole characters
            if name == "lines":  # the first such line start at or after m·K, if the window
                #  [m·K, (m + 1)·K) holds one
                found = [c for c in range(m * k, min((m + 1) * k, len(data)))
                         if _line_start(data, c)]
                assert start == found[0] if found else not _line_start(data, start), (m, start)
                at_lines += bool(found)
            if name == "words" and piece:  # (the last piece is empty: no word starts
                #  in the last window)
                assert data[start - 1:start + 2] in (b"c d", b"e f", b"h i", b"j a"), start
    assert at_lines > 10 and len(_pieces(tmp_path / "crlf.txt", k)) > 3  # CRLFs: none split


def test_byte_level_bpe_tokens_in_pieces_equal_the_whole_documents(tmp_path):
    """GPT-2's pre-tokenizer splits a line break between non-spaces off on its own, and merges
    stay within its splits: tokenising a document in pieces cut at line starts changes none."""
    rng = np.random.default_rng(1)
    words = ["low", "rank", "adapt", "ation", "lora", "jax", "(x)", "1234", "'s", ",", "é"]
    lines = [" ".join(rng.choice(words, int(rng.integers(1, 9)))) for _ in range(300)]
    lines = [("    " if i % 5 == 0 else "") + line for i, line in enumerate(lines)]
    text = "\n".join(lines[:150]) + "\n\n" + "\r\n".join(lines[150:])
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.train_from_iterator(lines, hf.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "bpe.json"))
    bpe = HFTokenizer(str(tmp_path / "bpe.json"))
    (tmp_path / "a.txt").write_bytes(text.encode())
    whole = bpe.encode((tmp_path / "a.txt").read_text(encoding="utf-8")) + [bpe.eos_id]
    assert len(text.encode()) > 40 * 128  # over 40 pieces of 128 bytes
    assert _stream(load_text(str(tmp_path / "a.txt"), bpe, 16, piece_bytes=128)) == whole


def test_empty_or_not_utf8_text_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"hold no text; pass at least one non-empty file"):
        load_text(str(tmp_path / "empty.txt"), TOK, seq_len=8)
    (tmp_path / "bad.txt").write_bytes(b"fine\n" * 20 + b"\xff\xfe")
    with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8 text at byte 100"):
        load_text(str(tmp_path / "bad.txt"), TOK, seq_len=8, piece_bytes=16)


def test_load_jsonl_unpacked_loss_on_completion_and_eos(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Q: 2+2? ", "completion": "4"}, "", "   ",
        {"prompt": "say hi ", "completion": "hi"}])
    data = load_jsonl(path, TOK, seq_len=16, pack=False)
    assert data["inputs"].shape == (2, 16)
    np.testing.assert_array_equal(data["segment_ids"], [[1] * 10 + [0] * 6] * 2)  # BOS + 9
    for row, (prompt, completion) in enumerate([("Q: 2+2? ", "4"), ("say hi ", "hi")]):
        mask = data["loss_mask"][row] > 0
        assert TOK.decode(data["inputs"][row]) == prompt + completion
        np.testing.assert_array_equal(data["targets"][row][mask],
                                      TOK.encode(completion) + [TOK.eos_id])
        assert np.argmax(mask) == len(prompt)


def test_load_jsonl_packs_whole_examples_per_task(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}", "task": "ab"[i % 2]}
               for i in range(6)]  # each example: BOS p i c i EOS = 6 tokens
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    data = load_jsonl(path, TOK, seq_len=12)  # 13 tokens per row -> 2 examples per row
    np.testing.assert_array_equal(data["task_ids"], [0, 0, 1, 1])
    for row in range(4):
        tokens = data["inputs"][row]
        starts = np.flatnonzero(tokens == TOK.bos_id)
        assert starts.tolist() in ([0, 6], [0])  # examples start at BOS, never split
        seg = data["segment_ids"][row]
        assert np.flatnonzero(np.diff(seg, prepend=0) > 0).tolist() == starts.tolist()
    assert data["loss_mask"].sum() == 6 * 3  # completion (2) + EOS per example
    assert TOK.decode(data["inputs"][0]) == "p0c0p2c2"
    mapped = load_jsonl(path, TOK, seq_len=12, task_names=["x", "b", "a"])
    np.testing.assert_array_equal(mapped["task_ids"], [1, 1, 2, 2])


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"prompt": "x"}', "missing key 'completion'"),
    ('{"prompt": 3, "completion": "x"}', "'prompt' must be a string"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"prompt": "a", "completion": "b", "task": 1.5}', "'task' must be an int or a string"),
])
def test_load_jsonl_malformed_line_names_file_and_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        load_jsonl(path, TOK, seq_len=16)


def test_load_jsonl_too_long_example_names_line(tmp_path):
    path = _write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "a", "completion": "b"}, {"prompt": "x" * 20, "completion": "y"}])
    with pytest.raises(ValueError, match=r"long\.jsonl:2: example has 23 tokens.*seq_len to 22"):
        load_jsonl(path, TOK, seq_len=16)
