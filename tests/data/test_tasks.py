"""Tests for lora_jax.data.tasks: task families, dataset layout, splits, scoring."""

import numpy as np
import pytest

from lora_jax.data.tasks import (
    TASKS, exact_match, make_task_dataset, per_task_accuracy, sample_pairs, task_names)
from lora_jax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
DIGIT_TASKS = ["digits_reverse", "digits_sort", "digits_sort_desc", "digits_rotate"]


def _prompts(data):
    """Returns the prompt text of each row (tokens after BOS, before the first loss target)."""
    first = data["loss_mask"].argmax(axis=1)
    return [TOK.decode(row[1:f + 1]) for row, f in zip(data["inputs"], first)]


def test_required_families_exist():
    for name in ["copy", "reverse", "sort", "add", "modular", "kv_recall", *DIGIT_TASKS]:
        assert name in TASKS and name in task_names()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_family_fits_default_seq_len_with_bytes(name):
    for prompt, answer in sample_pairs(name, "train", 300, seed=1):
        assert len(prompt) + len(answer) + 2 <= 32, (prompt, answer)
        assert prompt.endswith("=") and answer


def test_layout_is_shifted_with_completion_only_loss():
    tasks = ["add", "reverse", "digits_sort"]
    data = make_task_dataset(tasks, "train", 20, seed=0, seq_len=32, tokenizer=TOK)
    assert data["inputs"].shape == data["targets"].shape == data["loss_mask"].shape == (60, 32)
    assert (data["inputs"].dtype, data["targets"].dtype) == (np.int32, np.int32)
    assert data["loss_mask"].dtype == np.float32 and data["task_ids"].dtype == np.int32
    np.testing.assert_array_equal(data["task_ids"], np.repeat([0, 1, 2], 20))
    assert (data["inputs"][:, 0] == TOK.bos_id).all()
    inside = data["inputs"][:, 1:] != TOK.pad_id
    np.testing.assert_array_equal(data["inputs"][:, 1:][inside], data["targets"][:, :-1][inside])
    for row, tgt, mask in zip(data["inputs"], data["targets"], data["loss_mask"]):
        loss_targets = tgt[mask > 0]
        assert loss_targets[-1] == TOK.eos_id and (mask[tgt == TOK.pad_id] == 0).all()
        text = TOK.decode(row)
        prompt, answer = text.split("=")[0] + "=", TOK.decode(loss_targets[:-1])
        assert text == prompt + answer
        mask_start = int(np.argmax(mask))
        assert mask_start == len(prompt)  # target at t is token t+1: first answer token
    add_prompts = _prompts({k: v[:20] for k, v in data.items()})
    answers = [TOK.decode(t[m > 0]) for t, m in zip(data["targets"][:20], data["loss_mask"][:20])]
    for prompt, answer in zip(add_prompts, answers):
        a, b = prompt[:-1].split("+")
        assert int(answer) == int(a) + int(b)


def test_modular_and_kv_answers_are_correct():
    for prompt, answer in sample_pairs("modular", "train", 200, seed=3):
        mod, expr = prompt[:-1].split(" ")
        m = int(mod[3:])
        op = next(c for c in "+-*" if c in expr)
        a, b = (int(x) for x in expr.split(op))
        assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op] % m
    for prompt, answer in sample_pairs("kv_recall", "train", 200, seed=3):
        pairs, key = prompt[:-1].split("?")
        assert dict(zip(pairs[::2], pairs[1::2]))[key] == answer


def test_train_and_eval_never_overlap():
    names = task_names()
    train = make_task_dataset(names, "train", 400, seed=0, seq_len=32, tokenizer=TOK)
    evals = make_task_dataset(names, "eval", 400, seed=0, seq_len=32, tokenizer=TOK)
    train_prompts, eval_prompts = set(_prompts(train)), set(_prompts(evals))
    assert len(eval_prompts) > 1000
    assert not train_prompts & eval_prompts  # not even across tasks


def test_deterministic_and_seed_dependent():
    a = make_task_dataset(["copy", "add"], "train", 50, seed=7, seq_len=32, tokenizer=TOK)
    b = make_task_dataset(["copy", "add"], "train", 50, seed=7, seq_len=32, tokenizer=TOK)
    c = make_task_dataset(["copy", "add"], "train", 50, seed=8, seq_len=32, tokenizer=TOK)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"])
    alone = make_task_dataset(["add"], "train", 50, seed=7, seq_len=32, tokenizer=TOK)
    np.testing.assert_array_equal(alone["inputs"], a["inputs"][50:])  # order-independent


def test_digit_families_conflict_on_identical_prompts():
    answers = {t: dict(sample_pairs(t, "train", 2000, seed=0)) for t in DIGIT_TASKS}
    for t in DIGIT_TASKS:  # one format: bare digits then '='
        assert all(p[:-1].isdigit() and 3 <= len(p) - 1 <= 8 for p in answers[t])
    shared = set.intersection(*(set(a) for a in answers.values()))
    assert len(shared) > 10
    for p in shared:
        assert len({answers[t][p] for t in DIGIT_TASKS}) >= 2 or len(set(p[:-1])) == 1
    got = [TASKS[t].sample(np.random.default_rng(0)) for t in DIGIT_TASKS]
    prompt = got[0][0]
    d = prompt[:-1]
    assert all(p == prompt for p, _ in got)  # same rng -> same prompt in every family
    assert [a for _, a in got] == [
        d[::-1], "".join(sorted(d)), "".join(sorted(d, reverse=True)), d[1:] + d[0]]


def test_unknown_task_and_too_long_errors():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; valid tasks: \['copy'"):
        make_task_dataset(["nope"], "train", 1, seed=0, seq_len=32, tokenizer=TOK)
    with pytest.raises(ValueError, match=r"task 'sort'.*needs seq_len >= \d+ \(got 8\)"):
        make_task_dataset(["sort"], "train", 10, seed=0, seq_len=8, tokenizer=TOK)
    with pytest.raises(ValueError, match="split 'test'"):
        make_task_dataset(["copy"], "test", 1, seed=0, seq_len=32, tokenizer=TOK)


def test_exact_match_and_per_task_accuracy():
    tasks = ["copy", "digits_rotate"]
    data = make_task_dataset(tasks, "eval", 10, seed=0, seq_len=32, tokenizer=TOK)
    pred = data["targets"].copy()
    assert exact_match(pred, data["targets"], data["loss_mask"]).all()
    pred[data["loss_mask"] == 0] = 0  # outside the mask does not matter
    assert exact_match(pred, data["targets"], data["loss_mask"]).all()
    first = data["loss_mask"].argmax(axis=1)
    pred[np.arange(3), first[:3]] += 1  # break three copy rows
    correct = exact_match(pred, data["targets"], data["loss_mask"])
    assert correct.tolist() == [False] * 3 + [True] * 17
    acc = per_task_accuracy(correct, data["task_ids"], tasks)
    assert acc == pytest.approx({"copy": 0.7, "digits_rotate": 1.0, "mean": 0.85})
    with pytest.raises(ValueError, match="shapes differ"):
        exact_match(pred[:, :-1], data["targets"], data["loss_mask"])
