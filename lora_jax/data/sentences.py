"""A sentence-pair task the project builds itself: does sentence B mean the same as sentence A?

Sentence A is templated, `the {adj} {subject} {verb}s the {object}.`, from small word lists.
Half of the B sentences are paraphrases (synonyms swapped in, or the passive voice), half are
not: subject and object swapped (the same words as A, so a bag of words cannot tell), the
passive with the roles reversed, a negation, or another object. Synonyms are drawn for
positives and negatives alike, so word overlap is no cue either. Labels are 1 (same meaning) and
0; classes are balanced. Train and eval use disjoint (subject, object) pairs, so eval measures
generalisation to unseen combinations. `encode_pairs` tokenises with a BERT WordPiece
tokenizer (`tokenizer.json` or `vocab.txt`, e.g. the one shipped with all-MiniLM-L6-v2) into
`[CLS] A [SEP] B [SEP]` with token types 0/1. Models and training live elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np

NOUNS = ("teacher", "doctor", "farmer", "child", "dog", "cat", "horse", "student", "pilot",
         "nurse", "artist", "baker", "lawyer", "sailor", "king", "queen")
ADJECTIVES = (("big", "large"), ("small", "little"), ("happy", "glad"), ("quick", "fast"),
              ("angry", "mad"), ("smart", "clever"), ("tired", "sleepy"), ("rich", "wealthy"))
# Synonym pairs of verbs as (base, third person, past participle).
VERBS = ((("chase", "chases", "chased"), ("pursue", "pursues", "pursued")),
         (("help", "helps", "helped"), ("assist", "assists", "assisted")),
         (("fix", "fixes", "fixed"), ("repair", "repairs", "repaired")),
         (("hit", "hits", "hit"), ("strike", "strikes", "struck")),
         (("watch", "watches", "watched"), ("observe", "observes", "observed")),
         (("call", "calls", "called"), ("phone", "phones", "phoned")),
         (("praise", "praises", "praised"), ("compliment", "compliments", "complimented")),
         (("leave", "leaves", "left"), ("abandon", "abandons", "abandoned")))
TASK = "paraphrase"  # the task's name (its one task id, 0) in per-task accuracies
KINDS = {1: ("synonyms", "passive"), 0: ("swapped", "passive_swapped", "negated", "other_object")}


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example: sentences `a` and `b`, `label` 1 (same meaning) or 0, how b was made."""

    a: str
    b: str
    label: int
    kind: str


def is_eval_pair(subject: int, obj: int) -> bool:
    """The fixed split of ordered (subject, object) noun-index pairs: about 1 in 5 are eval."""
    return (7 * subject + 3 * obj) % 5 == 0


def make_pair(rng: random.Random, split: str) -> Pair:
    """One example (label 0 or 1 equally likely) with (subject, object) nouns from `split`."""
    while True:
        s, o = rng.sample(range(len(NOUNS)), 2)
        if is_eval_pair(s, o) == (split == "eval"):
            break
    subj, obj = NOUNS[s], NOUNS[o]
    adj, verb = rng.choice(ADJECTIVES), rng.choice(VERBS)
    pick = lambda group: rng.choice(group)
    a = f"the {adj[0]} {subj} {verb[0][1]} the {obj}."
    label = rng.randrange(2)
    kind = rng.choice(KINDS[label])
    v, j = pick(verb), pick(adj)
    if kind == "synonyms":
        v, j = verb[1], adj[1]  # at least the verb and the adjective change
        b = f"the {j} {subj} {v[1]} the {obj}."
    elif kind == "passive":
        b = f"the {obj} is {v[2]} by the {j} {subj}."
    elif kind == "swapped":
        b = f"the {obj} {v[1]} the {j} {subj}."
    elif kind == "passive_swapped":
        b = f"the {j} {subj} is {v[2]} by the {obj}."
    elif kind == "negated":
        b = f"the {j} {subj} does not {v[0]} the {obj}."
    else:
        other = NOUNS[rng.choice([i for i in range(len(NOUNS)) if i not in (s, o)])]
        b = f"the {j} {subj} {v[1]} the {other}."
    return Pair(a, b, label, kind)


def make_pairs(n: int, seed: int, split: str = "train") -> list[Pair]:
    """`n` examples of `split` ('train' or 'eval'), a pure function of (n, seed, split)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; use 'train' or 'eval'.")
    rng = random.Random(f"{seed}/{split}")
    return [make_pair(rng, split) for _ in range(n)]


SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_wordpiece(path: str) -> Any:
    """A `tokenizers` BERT WordPiece tokenizer from a `tokenizer.json`, a `vocab.txt` (uncased),
    or 'template': a vocab of just `SPECIALS` + the templates' words ([PAD] = 0), for models
    trained from scratch on this task (tests, CI without the wheel)."""
    import tokenizers

    if path == "template":
        words = list(SPECIALS) + vocabulary()
        return tokenizers.BertWordPieceTokenizer({w: i for i, w in enumerate(words)},
                                                 lowercase=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No tokenizer at {path!r}; pass a BERT tokenizer.json or "
                                "vocab.txt (all-MiniLM-L6-v2 ships both), or 'template'.")
    if path.endswith(".json"):
        return tokenizers.Tokenizer.from_file(path)
    return tokenizers.BertWordPieceTokenizer(path, lowercase=True)


def encode_pairs(pairs: list[Pair], tokenizer: Any, max_len: int = 32) -> dict[str, np.ndarray]:
    """Tokenises `[CLS] a [SEP] b [SEP]`, padded with id 0 to `max_len`.

    Returns {'tokens', 'token_types': int32 (n, max_len), 'mask': bool (n, max_len),
    'labels': int32 (n,)}. Raises if a pair does not fit or a word is not in the vocab.
    """
    tokenizer.no_padding()
    tokenizer.no_truncation()
    enc = tokenizer.encode_batch([(p.a, p.b) for p in pairs])
    unk = tokenizer.token_to_id("[UNK]")
    n = len(pairs)
    out = {"tokens": np.zeros((n, max_len), np.int32),
           "token_types": np.zeros((n, max_len), np.int32),
           "mask": np.zeros((n, max_len), bool),
           "labels": np.array([p.label for p in pairs], np.int32)}
    for i, (e, p) in enumerate(zip(enc, pairs)):
        if len(e.ids) > max_len:
            raise ValueError(f"pair {p.a!r} / {p.b!r} has {len(e.ids)} tokens > max_len="
                             f"{max_len}; raise max_len.")
        if unk is not None and unk in e.ids:
            texts = (p.a, p.b)
            words = [texts[sid][lo:hi] for j, (lo, hi), sid in
                     zip(e.ids, e.offsets, e.sequence_ids) if j == unk]
            raise ValueError(f"pair {p.a!r} / {p.b!r} has words outside the vocab: {words}; "
                             "use the model's own tokenizer (vocab.txt / tokenizer.json).")
        k = len(e.ids)
        out["tokens"][i, :k], out["token_types"][i, :k] = e.ids, e.type_ids
        out["mask"][i, :k] = True
    return out


def pair_dataset(tokenizer_path: str, n_train: int, n_eval: int, seed: int = 0,
                 max_len: int = 32) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, eval) arrays of the pair task, tokenised with the tokenizer at `tokenizer_path`."""
    tok = load_wordpiece(tokenizer_path)
    return (encode_pairs(make_pairs(n_train, seed, "train"), tok, max_len),
            encode_pairs(make_pairs(n_eval, seed, "eval"), tok, max_len))


def vocabulary() -> list[str]:
    """Every word the templates use (a tiny vocab.txt for tests needs these plus specials)."""
    words = {"the", "is", "by", "does", "not", "."} | set(NOUNS)
    words |= {w for group in ADJECTIVES for w in group}
    words |= {form for pair in VERBS for verb in pair for form in verb}
    return sorted(words)
