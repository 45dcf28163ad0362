"""The sentence-pair task: deterministic, balanced, split by unseen (subject, object) pairs, and
tokenised as [CLS] A [SEP] B [SEP] with a WordPiece vocab the test writes itself."""

import collections
import re

import numpy as np
import pytest

from lora_jax.data import sentences as S


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(list(S.SPECIALS) + S.vocabulary()) + "\n")
    return S.load_wordpiece(str(path))


def test_the_template_vocab_is_the_written_vocab_txt(tokenizer):
    pairs = S.make_pairs(16, 5)
    template = S.load_wordpiece("template")
    assert template.token_to_id("[PAD]") == 0 and template.get_vocab_size() < 120
    for k, v in S.encode_pairs(pairs, template).items():
        np.testing.assert_array_equal(v, S.encode_pairs(pairs, tokenizer)[k])


def _roles(sentence):
    m = re.fullmatch(r"the (?:\w+ )?(\w+) \w+ the (?:\w+ )?(\w+)\.", sentence)
    return m.groups() if m else None


def test_pairs_are_deterministic_balanced_and_split_by_noun_pair():
    train, evals = S.make_pairs(2000, 0, "train"), S.make_pairs(400, 0, "eval")
    assert train[:50] == S.make_pairs(50, 0, "train") and train[:50] != S.make_pairs(50, 1)[:50]
    assert abs(np.mean([p.label for p in train]) - 0.5) < 0.05
    kinds = collections.Counter(p.kind for p in train)
    assert set(kinds) == set(S.KINDS[0] + S.KINDS[1]) and min(kinds.values()) > 150
    pairs = lambda ps: {_roles(p.a) for p in ps}
    assert not pairs(train) & pairs(evals)  # eval subject/object pairs are never trained on
    for p in train[:200]:
        if p.kind == "swapped":  # the hard negatives: the same nouns, the roles reversed
            assert _roles(p.b) == _roles(p.a)[::-1]


def test_encode_pairs_cls_a_sep_b_sep(tokenizer):
    pairs = S.make_pairs(8, 3)
    enc = S.encode_pairs(pairs, tokenizer, max_len=24)
    assert enc["tokens"].shape == enc["token_types"].shape == enc["mask"].shape == (8, 24)
    np.testing.assert_array_equal(enc["labels"], [p.label for p in pairs])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    for i, p in enumerate(pairs):
        ids = enc["tokens"][i][enc["mask"][i]]
        types = enc["token_types"][i][enc["mask"][i]]
        first_sep = list(ids).index(sep)
        assert ids[0] == cls and ids[-1] == sep and np.all(enc["tokens"][i][~enc["mask"][i]] == 0)
        assert np.all(types[: first_sep + 1] == 0) and np.all(types[first_sep + 1:] == 1)
        assert tokenizer.decode(ids[1:first_sep].tolist()).replace(" .", ".") == p.a


def test_encode_pairs_names_unknown_words_and_overlong_pairs(tokenizer):
    with pytest.raises(ValueError, match="zebra"):
        S.encode_pairs([S.Pair("the zebra helps the cat.", "the cat.", 0, "x")], tokenizer)
    with pytest.raises(ValueError, match="max_len=8"):
        S.encode_pairs(S.make_pairs(1, 0), tokenizer, max_len=8)
