"""The near-miss error of a rule that matches nothing: suggestions ranked by path segment (a
layer's role counts across model families), each the regex that would match, kernels only."""

import re

import numpy as np
import pytest

from lora_jax import rules

LEAF = np.zeros((2, 2))


def gpt2_like(n_layers=2):
    dense = {"kernel": LEAF, "bias": LEAF}
    layer = {"attn": {"c_attn": dense, "c_proj": dense}, "mlp": {"c_fc": dense, "c_proj": dense},
             "ln_1": {"scale": LEAF, "bias": LEAF}}
    return {**{f"h_{i}": layer for i in range(n_layers)}, "wte": {"embedding": LEAF},
            "head": {"kernel": LEAF}}


def bert_like(n_layers=2):
    attn = {name: {"kernel": LEAF, "bias": LEAF} for name in ("query", "key", "value", "out")}
    return {"blocks": {f"layer_{i}": {"attn": attn, "mlp": {"fc1": {"kernel": LEAF}}}
                       for i in range(n_layers)}, "head": {"kernel": LEAF}}


def error(params, targets):
    with pytest.raises(ValueError) as info:
        rules.select_targets(params, targets, rank=2, alpha=4.0)
    return str(info.value)


def suggestions(message):
    """The suggested regexes, in order."""
    return re.findall(r"'([^']+)' \(matches", message)


def test_query_value_suggest_the_nested_kernels():
    params = bert_like()
    for word in ("query", "value"):
        msg = error(params, (word,))
        assert msg.startswith(f"rule {word!r} matched no parameter; closest: '.*/{word}/kernel' "
                              f"(matches 2, e.g. 'blocks/layer_0/attn/{word}/kernel')")
        assert suggestions(msg)[0] == f".*/{word}/kernel"
        assert len(rules.select_targets(params, (suggestions(msg)[0],), rank=2, alpha=4.0)) == 2


def test_q_proj_on_gpt2_suggests_the_fused_attention_kernel_not_a_bias():
    msg = error(gpt2_like(), ("q_proj",))
    got = suggestions(msg)
    assert got[0] == ".*/c_attn/kernel"
    assert not any(s.endswith("bias") for s in got)
    assert "'.*/c_attn/kernel' (matches 2, e.g. 'h_0/attn/c_attn/kernel')" in msg


@pytest.mark.parametrize("target,expected", [("up_proj", ".*/c_fc/kernel"),
                                             ("o_proj", ".*/c_proj/kernel"),
                                             ("c_atn", ".*/c_attn/kernel"),
                                             ("attn/.*/c_attn", ".*/attn/c_attn/kernel"),
                                             ("c_attn/bias", ".*/c_attn/bias")])
def test_other_near_misses(target, expected):
    assert suggestions(error(gpt2_like(), (target,)))[0] == expected


def test_a_top_level_path_is_proposed_as_is():
    params = {"query": {"kernel": LEAF}, "head": {"kernel": LEAF}}
    assert suggestions(error(params, ("querry/kernel",)))[0] == "query/kernel"


def test_every_suggestion_matches_what_it_says():
    params = gpt2_like(3)
    paths = sorted(rules.flatten(params))
    msg = error(params, ("q_proj",))
    for regex, count in re.findall(r"'([^']+)' \(matches (\d+)", msg):
        assert sum(bool(re.fullmatch(regex, p)) for p in paths) == int(count)


def test_exclude_near_miss_uses_the_same_suggestions():
    with pytest.raises(ValueError, match=r"exclude pattern 'c_fcc' matched no parameter; closest: "
                                         r"'\.\*/c_fc/kernel'"):
        rules.select_targets(gpt2_like(), ("qv",), rank=2, alpha=4.0, exclude=("c_fcc",))
