"""Per-host data: simulated processes (0, P) .. (P - 1, P) each tokenise only their share, and
what they build, put together, is the 1-process data. Train: their local batches, concatenated,
are the 1-process global batches (JSONL with packing, the built-in tasks, text in pieces of
PIECE bytes). Eval: each builds only its contiguous share of the eval rows (every kind), the
shares concatenated are the 1-process eval set, and `steps.evaluate` over the shares gives the
1-process numbers. The processes run in threads, so the gathers (JSONL lengths, text piece
lengths, eval results) meet as the trainer's `allgather` does across real processes."""

import json
import os
import pathlib
import threading
import types

import numpy as np
import pytest

from lora_jax.data import ArrayLoader, ByteTokenizer, EvalLoader, get_kind, images, sentences
from lora_jax.data import text as text_module
from lora_jax.data.text import text_rows
from lora_jax.train.steps import evaluate

SEQ, BATCH, STEPS = 32, 4, 6  # 6 steps: more than one epoch of the JSONL rows
PIECE = 64  # bytes per piece of a text document (PIECE_BYTES) in these tests


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer that counts its `encode` calls and the characters it encodes; with
    `mark`, each call's tokens start with a mark (id 259), as a sentencepiece tokenizer marks
    the start of each text it is given, so where a text is cut shows in its tokens."""

    def __init__(self, mark=False):
        self.calls, self.chars, self.mark = 0, 0, mark

    def encode(self, text):
        self.calls += 1
        self.chars += len(text)
        return [259] * self.mark + super().encode(text)


def _allgathers(count: int):
    """`allgather` functions, one per simulated process, meeting at a barrier."""
    parts, barrier = [None] * count, threading.Barrier(count)

    def gather(i, x):
        parts[i] = x
        barrier.wait()
        out = np.concatenate(parts)
        barrier.wait()
        return out
    return [lambda x, i=i: gather(i, x) for i in range(count)]


def _in_threads(count: int, fn):
    """`[fn(i, allgather_i) for i in range(count)]`, each call in its own thread."""
    out, gathers = [None] * count, _allgathers(count)

    def run(i):
        out[i] = fn(i, gathers[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None for o in out)
    return out


def _tokenizer(kind, dc):
    return CountingTokenizer() if kind in ("tasks", "jsonl", "text") else \
        get_kind(kind).tokenizer(dc)


def _load(kind: str, dc, count: int):
    """Per process: ((train rows, eval rows), its tokenizer) after `Kind.load` with `count`
    processes."""
    def load(i, gather):
        tok = _tokenizer(kind, dc)
        return get_kind(kind).load(dc, tok, i, count, gather)[:2], tok
    return _in_threads(count, load)


def _jsonl(tmp_path):
    rng = np.random.default_rng(0)
    line = lambda: json.dumps({"prompt": "p" * int(rng.integers(1, 9)),
                               "completion": "c" * int(rng.integers(1, 9)),
                               "task": int(rng.integers(0, 2))})
    path, evals = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    path.write_text("\n".join(line() for _ in range(60)))
    evals.write_text("\n".join(line() for _ in range(11)))  # 11 rows, two tasks interleaved
    return types.SimpleNamespace(train_path=str(path), eval_path=str(evals), seq_len=SEQ)


def _tasks(tmp_path):  # 3 tasks of 3 eval rows: 9 rows
    return types.SimpleNamespace(tasks=("copy", "add", "reverse"), n_train_per_task=16,
                                 n_eval_per_task=3, seed=3, seq_len=SEQ)


def _text(tmp_path):
    rng = np.random.default_rng(1)
    words = lambda n: "".join("".join(rng.choice(list("abcdé"), 4)) + " \n"[i % 7 == 6]
                              for i in range(n))
    path, evals = tmp_path / "t.txt", tmp_path / "e.txt"
    path.write_text(words(120))  # 600 characters in lines of 7 words, 'é' two bytes
    evals.write_text("abc é " * 31 + "ab")  # 219 bytes (+ EOS): 7 rows of 32 targets
    return types.SimpleNamespace(train_path=str(path), eval_path=str(evals), seq_len=SEQ)


def _pieces(*paths):
    """Pieces of PIECE bytes of each text file: its size, rounded up."""
    return [-(-os.path.getsize(p) // PIECE) for p in paths]


def _sentences(tmp_path):
    return types.SimpleNamespace(tasks=(sentences.TASK,), tokenizer="template",
                                 n_train_per_task=8, n_eval_per_task=7, seed=0, seq_len=SEQ)


def _images(tmp_path):
    return types.SimpleNamespace(tasks=tuple(images.task_names()[:3]), n_train_per_task=8,
                                 n_eval_per_task=5, seed=0)


CONFIGS = {"jsonl": _jsonl, "tasks": _tasks, "text": _text, "sentences": _sentences,
           "images": _images}


@pytest.mark.parametrize("kind", ["jsonl", "tasks", "text"])
def test_two_hosts_tokenise_their_half_and_their_batches_make_the_global_one(kind, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(text_module, "PIECE_BYTES", PIECE)
    dc = CONFIGS[kind](tmp_path)
    ((whole, _), whole_tok), = _load(kind, dc, 1)
    hosts = _load(kind, dc, 2)
    n = whole.num_rows
    assert all(rows.num_rows == n for (rows, _), _ in hosts)
    at_load = [whole_tok.calls] + [tok.calls for _, tok in hosts]
    chars = [whole_tok.chars] + [tok.chars for _, tok in hosts]
    one = ArrayLoader(whole, BATCH, seed=1)
    loaders = [ArrayLoader(rows, BATCH, seed=1, process_index=i, process_count=2)
               for i, ((rows, _), _) in enumerate(hosts)]
    for step in range(STEPS):  # over an epoch boundary
        want = one.batch(step)
        got = [lo.batch(step) for lo in loaders]
        assert set(want) == set(got[0]) and len(want["inputs"]) == BATCH
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], k)
    calls = [whole_tok.calls] + [tok.calls for _, tok in hosts]
    print(f"{kind}: {n} rows; encode calls at load {at_load}, after {STEPS} steps {calls}")
    if kind == "jsonl":  # the length passes: each host tokenises half of the train examples
        #  (60, prompt and completion) and its share of the eval examples (5 or 6)
        assert at_load == [2 * 60 + 2 * 11, 60 + 2 * 5, 60 + 2 * 6] and n < 60
        assert max(calls[1:]) < calls[0]  # + its rows' examples outside its half
    elif kind == "tasks":  # rows are examples: each host tokenises exactly half of the rows
        rows = [2 * STEPS * BATCH // p for p in (1, 2, 2)]  # prompt and answer per row
        assert [c - a for c, a in zip(calls, at_load)] == rows
    else:  # the length passes: each host tokenises its half of each document's pieces
        train, evals = _pieces(dc.train_path, dc.eval_path)
        assert train > 5 and at_load == [train + evals, train // 2 + evals // 2,
                                         train - train // 2 + evals - evals // 2]
        texts = [pathlib.Path(p).read_text("utf-8") for p in (dc.train_path, dc.eval_path)]
        assert chars[1] + chars[2] == chars[0] == sum(map(len, texts))  # every piece, once
        assert calls[0] == at_load[0]  # later: the pieces of its rows outside its half
    full = whole.take(np.arange(n))  # the rows taken are those of the whole dataset
    np.testing.assert_array_equal(one.batch(7)["inputs"], full["inputs"][one.batch_indices(7)])


@pytest.mark.parametrize("count", [2, 3])
def test_text_hosts_tokenise_their_share_of_the_pieces_and_build_one_processs_rows(count,
                                                                                   tmp_path):
    """Two documents of many pieces, with a tokenizer that marks where each text it is given
    starts: P processes' rows equal one process's, so every process cut the documents in the
    same places, and in the length pass each tokenised exactly its contiguous share of the
    pieces (n·p / P .. n·(p + 1) / P), each piece once over all processes."""
    rng = np.random.default_rng(2)
    line = lambda: " ".join(["lora", "rank", "é", "\tjax"][i] for i in rng.integers(0, 4, 9))
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    paths[0].write_text("\n".join(line() for _ in range(40)))
    paths[1].write_text("\n\n".join(line() for _ in range(25)))
    paths = [str(p) for p in paths]
    n = sum(_pieces(*paths))

    def load(i, gather, count):  # (rows, encode calls and characters of the length pass)
        tok = CountingTokenizer(mark=True)
        rows = text_rows(paths, tok, SEQ, process_index=i, process_count=count,
                         allgather=gather, piece_bytes=PIECE)
        return rows, tok.calls, tok.chars

    ((one, calls, chars),) = _in_threads(1, lambda i, g: load(i, g, 1))
    hosts = _in_threads(count, lambda i, g: load(i, g, count))
    assert n > 2 * count and calls == n
    assert [c for _, c, _ in hosts] == [n * (p + 1) // count - n * p // count
                                        for p in range(count)]
    assert sum(c for _, _, c in hosts) == chars
    want = one.take(np.arange(one.num_rows))
    assert (want["inputs"] == 259).sum() > n // 2  # the marks of the pieces are in the rows
    for rows, _, _ in hosts:
        got = rows.take(np.arange(rows.num_rows))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], k)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_each_host_builds_only_its_eval_share_and_the_shares_make_the_eval_set(kind, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(text_module, "PIECE_BYTES", PIECE)
    dc = CONFIGS[kind](tmp_path)
    ((_, whole), _), = _load(kind, dc, 1)
    full = whole.take(np.arange(whole.num_rows)) if hasattr(whole, "take") else whole
    n = len(full["task_ids"])

    def host(i, gather):  # load, then its EvalLoader: what it tokenised for the eval set
        tok = _tokenizer(kind, dc)
        _, rows = get_kind(kind).load(dc, tok, i, 2, gather)[:2]
        before = getattr(tok, "calls", 0)
        evals = EvalLoader(rows, 4, process_index=i, process_count=2, allgather=gather)
        return evals, getattr(tok, "calls", 0) - before, getattr(tok, "calls", 0)

    hosts = _in_threads(2, host)
    shares = [(0, n // 2), (n // 2, n)]
    assert n % 2 == 1  # uneven shares, and neither a multiple of the local batch (2)
    for (evals, at_eval_loader, calls), (lo, hi) in zip(hosts, shares):
        assert evals.num_local == hi - lo and evals.num_batches == -(-(n - n // 2) // 2)
        for k, v in evals.rows.items():  # exactly its contiguous share, and nothing else
            np.testing.assert_array_equal(v, full[k][lo:hi], k)
        if kind == "tasks":  # its rows' prompts and answers (the load checked 1 per task)
            assert at_eval_loader == 2 * (hi - lo), at_eval_loader
        if kind == "jsonl":  # its share, tokenised once, in the length pass
            assert at_eval_loader == 0 and calls == 2 * 30 + 2 * (hi - lo)
        if kind == "text":  # its half of the pieces at load, + its rows' pieces beyond it
            train, evals = _pieces(dc.train_path, dc.eval_path)
            half = (train // 2 + evals // 2, train - train // 2 + evals - evals // 2)[lo > 0]
            assert calls - at_eval_loader == half and at_eval_loader <= 1, at_eval_loader
    for k in full:  # the union is the 1-process eval set
        np.testing.assert_array_equal(np.concatenate([e.rows[k] for e, _, _ in hosts]), full[k])


def _scores(t, f, batch):
    """A fake eval step: per-row (loss sum, weight, correct) from the row's own values."""
    x = batch["x"]
    return (np.sin(x).astype(np.float32) ** 2, (x % 3 + 1).astype(np.float32), x % 4 < 2)


@pytest.mark.parametrize("n, batch, count", [(9, 4, 2), (11, 6, 3), (1, 4, 2), (40, 8, 2)])
def test_evaluate_over_shares_gives_the_numbers_of_one_process(n, batch, count):
    """Uneven shares (11 rows over 3), shares shorter than a batch, a share with no row (1 row
    over 2), several batches: the shares' gathered scores give one process's loss and
    accuracy."""
    rows = {"x": np.arange(n) * 1.7, "task_ids": np.arange(n) % 3}
    tasks = ("a", "b", "c")
    want = evaluate(_scores, None, None, EvalLoader(rows, batch), tasks)
    got = _in_threads(count, lambda i, gather: evaluate(_scores, None, None, EvalLoader(
        rows, batch, process_index=i, process_count=count, allgather=gather), tasks))
    for g in got:
        assert g["loss"] == pytest.approx(want["loss"], rel=1e-6)
        np.testing.assert_equal(g["accuracy"], want["accuracy"])  # nan: a task without rows
    s, c, ok = _scores(None, None, rows)  # and those are the whole set's
    assert want["loss"] == pytest.approx(s.sum() / c.sum(), rel=1e-6)
    assert want["accuracy"]["a"] == pytest.approx(ok[rows["task_ids"] == 0].mean())
