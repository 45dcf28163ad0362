"""The base config every method's config starts from, and the ``:arg`` string parser.

Defaults live in ``lora_jax.train.config`` (the dataclasses); this turns them into a ConfigDict so
launches can override any field (``--config.optim.lr=1e-3``) and typos fail loudly.
"""

import ast

import ml_collections

from lora_jax import methods
from lora_jax.train.config import Experiment, to_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``Experiment()`` as a ConfigDict, with LoRA's arguments in ``method_args``."""
    del arg
    config = ml_collections.ConfigDict(to_dict(Experiment()))
    return set_method(config, "lora")


def set_method(config: ml_collections.ConfigDict, name: str, *also: str, **args):
    """``config.method = name`` with ``config.method_args`` holding the arguments of ``name`` and
    of the methods in ``also`` (a config that sweeps several methods holds their union; each run
    passes its method the ones it takes) at their defaults, updated with ``args``. So
    ``--config.method_args.init_weights=pissa`` works and a misspelled argument fails."""
    union = {}
    for n in (name, *also):
        for k, v in methods.arguments(n).items():
            union.setdefault(k, v)
    unknown = sorted(set(args) - set(union))
    if unknown:
        raise KeyError(f"method args {unknown} are not arguments of {[name, *also]}")
    config.method = name
    config.method_args = ml_collections.ConfigDict({**union, **args})
    return config


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


SWEEP_SIZES = ("small", "full")
SMALL_STEPS = 150  # a 'small' run: sized for a busy 2-core CPU (docs/ablations.md)


def split_size(arg: str, default: str = "full") -> tuple[str, str]:
    """``'small,rank=4'`` -> ``('small', 'rank=4')``: an optional leading sweep size, then the rest.

    The size (one of ``SWEEP_SIZES``) picks a sweep's grid in ``get_sweep`` and the run length that
    goes with it in ``get_config``, so ``--config=configs/lora.py:small`` means the same to both.
    """
    head, _, rest = (arg or "").partition(",")
    if head.strip() in SWEEP_SIZES:
        return head.strip(), rest
    return default, arg or ""


def apply_size(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """Denser evals for 'small' runs, so their short eval-loss curves have points to show.

    (Not denser logging: ``train.log_every`` is part of the cached base model's key, so changing it
    would pretrain a second base.)
    """
    if size == "small":
        config.train.eval_every = 25
    return config
