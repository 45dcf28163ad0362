"""Per-host data: simulated processes (0, 2) and (1, 2) each tokenise about half of the train
rows, and their local batches, concatenated, are the 1-process global batches (JSONL with
packing, and the built-in tasks). The two processes run in threads so the JSONL length pass can
gather its lengths as the trainer's `allgather` does across real processes."""

import json
import threading
import types

import numpy as np
import pytest

from lora_jax.data import ArrayLoader, ByteTokenizer, get_kind

SEQ, BATCH, STEPS = 32, 4, 6  # 6 steps: more than one epoch of the JSONL rows


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer that counts its `encode` calls."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


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


def _load(kind: str, dc, count: int):
    """Per process: (train rows, its tokenizer) after `Kind.load` with `count` processes."""
    out = [None] * count
    gathers = _allgathers(count)

    def run(i):
        tok = CountingTokenizer()
        out[i] = (get_kind(kind).load(dc, tok, i, count, gathers[i])[0], tok)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None for o in out)
    return out


def _jsonl(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({
        "prompt": "p" * int(rng.integers(1, 9)), "completion": "c" * int(rng.integers(1, 9)),
        "task": int(rng.integers(0, 2))}) for _ in range(60)))
    evals = tmp_path / "e.jsonl"  # eval is read whole on every host: 2 examples
    evals.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}')
    return types.SimpleNamespace(train_path=str(path), eval_path=str(evals), seq_len=SEQ)


def _tasks(tmp_path):
    return types.SimpleNamespace(tasks=("copy", "add"), n_train_per_task=16, n_eval_per_task=2,
                                 seed=3, seq_len=SEQ)


@pytest.mark.parametrize("kind, config", [("jsonl", _jsonl), ("tasks", _tasks)])
def test_two_hosts_tokenise_their_half_and_their_batches_make_the_global_one(
        kind, config, tmp_path):
    dc = config(tmp_path)
    (whole, whole_tok), = _load(kind, dc, 1)
    hosts = _load(kind, dc, 2)
    n = whole.num_rows
    assert all(rows.num_rows == n for rows, _ in hosts)
    at_load = [whole_tok.calls] + [tok.calls for _, tok in hosts]
    one = ArrayLoader(whole, BATCH, seed=1)
    loaders = [ArrayLoader(rows, BATCH, seed=1, process_index=i, process_count=2)
               for i, (rows, _) in enumerate(hosts)]
    for step in range(STEPS):  # over an epoch boundary
        want = one.batch(step)
        got = [lo.batch(step) for lo in loaders]
        assert set(want) == set(got[0]) and len(want["inputs"]) == BATCH
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], k)
    calls = [whole_tok.calls] + [tok.calls for _, tok in hosts]
    print(f"{kind}: {n} rows; encode calls at load {at_load}, after {STEPS} steps {calls}")
    if kind == "jsonl":  # the length pass: each host tokenises exactly half of the examples
        assert at_load[1] - 4 == at_load[2] - 4 == (at_load[0] - 4) // 2 == 60 and n < 60
    else:  # rows are examples: each host tokenises exactly half of the batches' rows
        rows = [2 * STEPS * BATCH // p for p in (1, 2, 2)]  # prompt and answer per row
        assert [c - a for c, a in zip(calls, at_load)] == rows
    assert max(calls[1:]) < calls[0]  # jsonl: + its rows' examples outside its half
    full = whole.take(np.arange(n))  # the rows taken are those of the whole dataset
    np.testing.assert_array_equal(one.batch(7)["inputs"], full["inputs"][one.batch_indices(7)])
