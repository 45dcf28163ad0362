"""Which parameters get adapters: paths, regex rules, presets and the selection report.

A parameter's path is its '/'-joined key path in the parameter tree (``'h_0/attn/c_attn/kernel'``).
Rules are ordered regular expressions matched in full against those paths; the first rule that
matches a path decides its rank and alpha (PEFT's ``rank_pattern`` / ``alpha_pattern``, written as
per-rule values). Every rule must match at least one path, and a rule that matches nothing is an
error naming the closest paths that exist. Nothing here builds adapters: see ``transform.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Mapping, Sequence

from flax import traverse_util

# Target presets for the project's own models (lora_jax.models: GPT-2 and Llama naming).
PRESETS: dict[str, str] = {
    "qv": r".*/(attn/c_attn|self_attn/(q_proj|v_proj))/kernel",
    "attn": r".*/(attn/(c_attn|c_proj)|self_attn/(q|k|v|o)_proj)/kernel",
    "all-linear": (
        r".*/(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj)|self_attn/(q|k|v|o)_proj"
        r"|mlp/(gate|up|down)_proj)/kernel"
    ),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One target rule: a regex over parameter paths, with optional per-rule rank and alpha.

    ``pattern`` may also be a preset name (``'qv'``, ``'attn'``, ``'all-linear'``).
    ``rank``/``alpha`` of ``None`` mean "the spec's default".
    """

    pattern: str
    rank: int | None = None
    alpha: float | None = None

    @property
    def regex(self) -> str:
        return PRESETS.get(self.pattern, self.pattern)


@dataclasses.dataclass(frozen=True)
class Target:
    """A selected kernel: its path and the rank/alpha its rule gave it."""

    path: str
    rule: int
    rank: int
    alpha: float


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> ``{'a/b/c': leaf}``."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def as_rules(targets: Sequence[str | Rule]) -> tuple[Rule, ...]:
    """Normalises a mix of strings and Rules into Rules."""
    if isinstance(targets, (str, Rule)):
        targets = (targets,)
    return tuple(t if isinstance(t, Rule) else Rule(t) for t in targets)


def _near_misses(pattern: str, paths: Sequence[str], n: int = 3) -> list[str]:
    close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
    return close or list(paths[:n])


def match_rules(
    paths: Sequence[str],
    rules: Sequence[Rule],
    exclude: Sequence[str] = (),
    what: str = "rule",
) -> dict[str, int]:
    """Maps each path to the index of the first rule that fully matches it.

    Paths matching any ``exclude`` regex are dropped. Raises ``ValueError`` for a rule (or an
    exclude pattern) that matches no path, naming the closest paths.
    """
    compiled = []
    for rule in rules:
        try:
            compiled.append(re.compile(rule.regex))
        except re.error as e:
            raise ValueError(f"{what} {rule.pattern!r} is not a valid regex: {e}") from None
    excluded = [re.compile(p) for p in exclude]
    for pat, rx in zip(exclude, excluded):
        if not any(rx.fullmatch(p) for p in paths):
            raise ValueError(
                f"exclude pattern {pat!r} matched no parameter; closest: {_near_misses(pat, paths)}"
            )
    chosen: dict[str, int] = {}
    hits = [0] * len(rules)
    for path in paths:
        for i, rx in enumerate(compiled):
            if rx.fullmatch(path):
                hits[i] += 1
                if not any(e.fullmatch(path) for e in excluded):
                    chosen[path] = i
                break
    for rule, count in zip(rules, hits):
        if count == 0:
            raise ValueError(
                f"{what} {rule.pattern!r} matched no parameter; closest: "
                f"{_near_misses(rule.regex, list(paths))}. Patterns are full-match regexes over "
                "'/'-joined paths."
            )
    return chosen


def select_targets(
    params: Mapping[str, Any],
    targets: Sequence[str | Rule],
    *,
    rank: int,
    alpha: float,
    exclude: Sequence[str] = (),
) -> list[Target]:
    """Selects the kernels to adapt, in path order.

    Args:
      params: the parameter tree (nested dicts of arrays).
      targets: ordered rules (strings, preset names or ``Rule``); first match wins.
      rank, alpha: defaults for rules that do not set their own.
      exclude: regexes of paths never to adapt.
    Returns:
      One ``Target`` per selected path.
    """
    rules = as_rules(targets)
    paths = sorted(flatten(params))
    chosen = match_rules(paths, rules, exclude)
    out = []
    for path, i in chosen.items():
        r = rules[i]
        out.append(Target(path, i, r.rank if r.rank is not None else rank,
                          float(r.alpha if r.alpha is not None else alpha)))
    return out
