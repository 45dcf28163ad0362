"""The base config every method's config starts from, and the ``:arg`` string parser.

Defaults live in ``lora_jax.train.config`` (the dataclasses); this turns them into a ConfigDict so
launches can override any field (``--config.optim.lr=1e-3``) and typos fail loudly.
"""

import ast

import ml_collections

from lora_jax.train.config import Experiment, to_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``Experiment()`` as a ConfigDict."""
    del arg
    return ml_collections.ConfigDict(to_dict(Experiment()))


def parse_arg(arg: str, **defaults) -> dict:
    """``'rank=4,targets=qv'`` -> ``{'rank': 4, 'targets': 'qv'}``, only keys in ``defaults``.

    Values are Python literals where they parse as one, strings otherwise; '+' separates the items
    of a multi-value string (``targets=qv+mlp``) since ',' separates keys.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config arg {item!r}: expected key=value with key in {sorted(defaults)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value.replace("+", ",")
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Applies ``{'optim.lr': 1e-3, ...}`` (dotted keys) to a copy of ``config``; unknown keys fail."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {dotted!r}: no such field")
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and \
            not isinstance(node[leaf], bool) else value
    return config
