"""Tests for lora_jax.data.text: plain text and JSONL loading, packing, host sharding."""

import json

import numpy as np
import pytest

from lora_jax.data.text import load_jsonl, load_text
from lora_jax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


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
