"""Which parameters get adapters: paths, regex rules, presets and the selection report.

A parameter's path is its '/'-joined key path in the parameter tree (``'h_0/attn/c_attn/kernel'``).
Rules are ordered regular expressions matched in full against those paths; the first rule that
matches a path decides its rank and alpha (PEFT's ``rank_pattern`` / ``alpha_pattern``, written as
per-rule values). Every rule must match at least one path, and a rule that matches nothing is an
error naming the closest paths that exist, ranked segment by segment (a known role counts: GPT-2's
``c_attn`` is near ``q_proj``), with the regex that would match them. Nothing here builds adapters:
see ``transform.py``.
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


# Names the same layer role goes by in common model families, so a rule written for one family
# finds its counterpart in another (``q_proj`` on GPT-2 -> ``c_attn``, the fused q/k/v projection).
# Suggestions only: nothing selects by role.
_ROLES = {
    **dict.fromkeys(("q", "query", "q_proj", "wq"), "q"),
    **dict.fromkeys(("k", "key", "k_proj", "wk"), "k"),
    **dict.fromkeys(("v", "value", "v_proj", "wv"), "v"),
    **dict.fromkeys(("qkv", "c_attn", "query_key_value", "in_proj", "qkv_proj", "wqkv"), "qkv"),
    **dict.fromkeys(("o", "o_proj", "out_proj", "wo", "out"), "o"),
    **dict.fromkeys(("gate_proj", "up_proj", "c_fc", "fc1", "wi", "w1", "w3", "intermediate",
                     "dense_h_to_4h"), "mlp_in"),
    **dict.fromkeys(("down_proj", "fc2", "w2", "dense_4h_to_h"), "mlp_out"),
}


def _same_role(a: str, b: str) -> float:
    """1 for the same role, 0.98 for q/k/v against a fused qkv projection, else 0."""
    ra, rb = _ROLES.get(a.lower()), _ROLES.get(b.lower())
    if ra is None or rb is None:
        return 0.0
    return 1.0 if ra == rb else 0.98 if {ra, rb} <= {"q", "k", "v", "qkv"} and "qkv" in (ra, rb) \
        else 0.0


_INDEX = re.compile(r"(_?\d+)$")


def _segment_score(token: str, segment: str) -> float:
    """How near a rule's word is to one path segment: 1 same, 0.95 same but for a layer index
    (``h`` / ``h_0``), 0.9 the same role (``q_proj`` / ``c_attn``), else spelling (≤ 0.85)."""
    if token == segment:
        return 1.0
    t, s = _INDEX.sub("", token), _INDEX.sub("", segment)
    if t and t == s:
        return 0.95
    if _same_role(t, s):
        return 0.9 * _same_role(t, s)
    return 0.85 * difflib.SequenceMatcher(None, t, s).ratio()


def _path_score(words: Sequence[str], path: str) -> tuple[float, int]:
    """``(mean over the rule's words of their best segment score, first matched segment)``."""
    segments = path.split("/")
    best = [max(((_segment_score(w, s), i) for i, s in enumerate(segments)),
                key=lambda t: (t[0], -t[1])) for w in words]
    near = [i for score, i in best if score >= 0.6]
    return sum(score for score, _ in best) / len(best), min(near) if near else len(segments) - 1


def _proposal(path: str, first: int) -> str:
    """The regex naming ``path`` from segment ``first`` on: ``'.*/query/kernel'``."""
    tail = "/".join(re.escape(s) for s in path.split("/")[first:])
    return tail if first == 0 else f".*/{tail}"


def _near_misses(pattern: str, paths: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` suggestions for a pattern that matched nothing: the regexes that would match the
    nearest paths, each with an example and its count, nearest first.

    Paths are ranked by their segments against the pattern's words (``_segment_score``); only
    kernels (and embeddings) are proposed unless the pattern names a bias or scale; after the
    nearest, only near ones are named.
    ``_near_misses('query', paths)`` ->
    ``["'.*/query/kernel' (matches 4, e.g. 'blocks_0/attn/query/kernel')", ...]``.
    """
    words = re.findall(r"[A-Za-z0-9_]+", pattern) or [pattern]
    candidates = [p for p in paths if p.endswith(("kernel", "embedding"))]
    if not candidates or re.search(r"bias|scale", pattern):  # else: adapters go on kernels
        candidates = list(paths)
    scores = {p: _path_score(words, p) for p in candidates}
    ranked = sorted(candidates, key=lambda p: (-scores[p][0], p))
    out, seen = [], set()
    for path in ranked:
        score, first = scores[path]
        regex = _proposal(path, first)
        if regex in seen or (out and score < 0.5):  # after the nearest, only near ones
            continue
        seen.add(regex)
        count = sum(1 for p in paths if re.fullmatch(regex, p))
        example = f", e.g. {path!r}" if count > 1 or regex != path else ""
        out.append(f"{regex!r} (matches {count}{example})")
        if len(out) == n:
            break
    return out


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
                f"exclude pattern {pat!r} matched no parameter; closest: "
                f"{'; '.join(_near_misses(pat, paths))}")
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
                f"{'; '.join(_near_misses(rule.regex, list(paths)))}. Patterns are full-match "
                "regexes over '/'-joined paths."
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
