"""PEFT adapter files both ways, and merged Hugging Face checkpoints, for `lora_jax.models`.

`save_peft` writes what `peft.PeftModel.from_pretrained` loads unchanged (`adapter_config.json`
and `adapter_model.safetensors`, keys `base_model.model.<hf module>.lora_A.weight` [r, in],
`lora_B.weight` [out, r], `lora_embedding_A` [r, vocab], `lora_embedding_B` [dim, r],
`lora_magnitude_vector` [out]); `load_peft` reads such files, PEFT's own included, back into
`Adapter` trees built by `lj.init_adapters`, so the adapter math stays in `methods/`. Multi-axis
kernels (GPT-2 `c_attn` (d, 3, heads, head_dim), Llama `o_proj` (heads, head_dim, d)) flatten
their input and output axes in C order, which is how `models/hf.py` reshapes HF weights; scanned
stacks are written as `layers.{i}` / `h.{i}`. `save_hf` writes a merged model as an HF checkpoint
(`config.json`, safetensors sharded at 5 GB). `peft_targets` turns a PEFT `target_modules` list
into lora_jax rules. Only GPT-2 and Llama as built in `lora_jax.models`; pickles are refused.
Reading HF configs and checkpoints lives in `models/hf.py`; lora_jax's own format in `io.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from lora_jax import rules
from lora_jax.io import check_fits
from lora_jax.models import hf as hf_models
from lora_jax.models.gpt2 import GPT2Config
from lora_jax.models.llama import LlamaConfig
from lora_jax.rules import Rule
from lora_jax.transform import LoraSpec, init_adapters

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_STACK = {"gpt2": "h", "llama": "layers"}
# Modules whose LoRA PEFT can tie to the LM head (peft's EMBEDDING_LAYER_NAMES).
_PEFT_TIEABLE = ("embed_tokens",)
# PEFT config keys that change nothing lora_jax computes once the weights are given (inits,
# bookkeeping); any other key with a truthy value is refused by name.
_HARMLESS = {
    "peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision",
    "inference_mode", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "peft_version", "megatron_core", "qalora_group_size", "layers_pattern",
    "layers_to_transform", "exclude_modules", "target_modules", "fan_in_fan_out", "lora_dropout",
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
    "ensure_weight_tying", "modules_to_tie", "target_modules_to_tie", "runtime_config", "bias",
}
_SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A",
             "lora_embedding_B": "B", "lora_magnitude_vector": "m",
             "lora_magnitude_vector.weight": "m"}


# ----------------------------------------------------------------------------- names


def family_of(params: Mapping[str, Any]) -> str:
    """'gpt2' or 'llama', from the top-level names of a `lora_jax.models` parameter tree."""
    if "wte" in params:
        return "gpt2"
    if "embed_tokens" in params:
        return "llama"
    raise ValueError(f"params with top-level keys {sorted(params)[:8]} are neither GPT-2 ('wte') "
                     "nor Llama ('embed_tokens') from lora_jax.models.")


def hf_module(family: str, path: str) -> tuple[str, bool]:
    """Our kernel path -> (HF module name, whether the path is a scanned stack).

    'h_3/attn/c_attn/kernel' -> ('transformer.h.3.attn.c_attn', False); a scanned
    'h/attn/c_attn/kernel' -> ('transformer.h.{}.attn.c_attn', True): format with the layer.
    """
    parts = path.split("/")
    if parts[-1] not in ("kernel", "embedding"):
        raise ValueError(f"{path!r} is not a kernel or embedding table; PEFT adapts modules.")
    mods, stack = parts[:-1], _STACK[family]
    if mods[0] == stack:
        mods[0], scanned = f"{stack}.{{}}", True
    else:
        mods[0], scanned = re.sub(rf"^{stack}_(\d+)$", rf"{stack}.\1", mods[0]), False
    name = ".".join(mods)
    if family == "gpt2":
        name = "transformer." + name
    elif name != "lm_head":
        name = "model." + name
    return name, scanned


def _our_path(family: str, module: str, flat: Mapping[str, Any]) -> tuple[str, int | None]:
    """HF module name -> (our kernel path, layer index into a scanned stack or None)."""
    head = "transformer." if family == "gpt2" else ("" if module == "lm_head" else "model.")
    if not module.startswith(head):
        raise ValueError(f"PEFT target module {module!r} is not a {family} module name "
                         f"(expected the prefix {head!r}).")
    stack = _STACK[family]
    rest = module[len(head):].split(".")
    layer = None
    if rest[0] == stack and len(rest) > 1 and rest[1].isdigit():
        layer, rest = int(rest[1]), [f"{stack}_{rest[1]}"] + rest[2:]
        if not any(p.startswith(rest[0] + "/") for p in flat):  # scanned stack
            rest[0] = stack
        else:
            layer = None
    base = "/".join(rest)
    for leaf in ("kernel", "embedding"):
        if f"{base}/{leaf}" in flat:
            return f"{base}/{leaf}", layer
    close = difflib.get_close_matches(f"{base}/kernel", list(flat), n=3, cutoff=0.0)
    raise ValueError(f"PEFT target module {module!r} does not exist in this {family} model "
                     f"(no parameter {base}/kernel); closest: {close}.")


def peft_targets(target_modules: Sequence[str] | str, family: str) -> tuple[str, ...]:
    """PEFT `target_modules` -> lora_jax target regexes for `lora_jax.models` GPT-2 / Llama.

    A list entry matches a module whose HF name equals it or ends with '.' + entry (PEFT's rule),
    so `["q_proj", "v_proj"]` works unchanged; a string is PEFT's full-match regex over HF names,
    translated by testing it against the family's module names for layers 0..999 (a regex that
    picks some layers becomes a rule for those layers of an unscanned model).
    Example: `lj.LoraSpec(targets=lj.peft_targets(["q_proj", "v_proj"], family="llama"))`.
    GPT-2's q, k and v are one fused `c_attn` kernel, so `"c_attn"` adapts all three.
    """
    if family not in _STACK:
        raise ValueError(f"family {family!r}: use 'gpt2' or 'llama'.")
    names = _module_templates(family)
    if isinstance(target_modules, str):
        rx = re.compile(target_modules)
        chosen = []
        for n, p in names.items():
            layers = [i for i in range(1000 if "{}" in n else 1) if rx.fullmatch(n.format(i))]
            if len(layers) < (1000 if "{}" in n else 1):
                p = p.replace("(_\\d+)?", f"_(?:{'|'.join(map(str, layers))})")
            chosen.extend([p] if layers else [])
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no {family} module; "
                             f"modules: {sorted(n.format(0) for n in names)}.")
        return tuple(chosen)
    out = []
    for t in target_modules:
        hits = [p for n, p in names.items() if n.format(0) == t or n.format(0).endswith("." + t)]
        if not hits:
            raise ValueError(f"target module {t!r} matches no {family} module; modules "
                             f"(layer 0): {sorted(n.format(0) for n in names)}.")
        out.extend(h for h in hits if h not in out)
    return tuple(out)


def _module_templates(family: str) -> dict[str, str]:
    """{HF module name with '{}' for the layer: our path regex (scanned or not)} per family."""
    stack = _STACK[family]
    if family == "gpt2":
        layer = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
        top = {"transformer.wte": "wte/embedding", "transformer.wpe": "wpe/embedding"}
        pre = "transformer."
    else:
        layer = tuple(f"self_attn/{m}_proj" for m in "qkvo") + tuple(
            f"mlp/{m}_proj" for m in ("gate", "up", "down"))
        top = {"model.embed_tokens": "embed_tokens/embedding", "lm_head": "lm_head/kernel"}
        pre = "model."
    out = {f"{pre}{stack}.{{}}.{m.replace('/', '.')}": f"{stack}(_\\d+)?/{m}/kernel"
           for m in layer}
    return {**out, **{k: re.escape(v) for k, v in top.items()}}


# ----------------------------------------------------------------------------- saving


def _method_name(adapter) -> str:
    return getattr(adapter.method, "name", adapter.method)


def _to_peft(adapter, layer: int | None) -> dict[str, np.ndarray]:
    """One layer's factors in PEFT's torch layout: A [r, in], B [out, r], m [out]."""
    take = (lambda x: np.asarray(x)) if layer is None else (lambda x: np.asarray(x[layer]))
    lay, p = adapter.layout, adapter.params
    a, b = take(p["a"]), take(p["b"])
    r = a.shape[-1]
    out = {"A": a.reshape(lay.d_in, r).T, "B": b.reshape(r, lay.d_out).T}
    if "m" in p:
        out["m"] = take(p["m"]).reshape(lay.d_out)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _tied_head(family: str, params: Mapping[str, Any]) -> bool:
    return family == "gpt2" or "lm_head" not in params


def save_peft(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    adapters: Mapping[str, Any],
    *,
    model_family: str | None = None,
    base_model_name_or_path: str | None = None,
    rslora: bool = False,
) -> None:
    """Writes `adapters` as a PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).

    Args:
      directory: created if missing.
      params: the base parameter tree the adapters were made for (names, layer count, tying).
      adapters: from `lj.init_adapters` (LoRA or DoRA, any per-rule rank/alpha, scanned or not).
      model_family: 'gpt2' or 'llama'; inferred from `params` if None.
      base_model_name_or_path: written into the config for PEFT to find the base model.
      rslora: write `use_rslora: true` with alpha = s·√r (else alpha = s·r); PEFT computes the
        same scale s either way.
    A LoRA on a tied embedding table also adapts the LM head in lora_jax; for Llama that is
    written as PEFT's `ensure_weight_tying: true` (plus the tied `lm_head` factors PEFT itself
    writes). PEFT cannot tie a GPT-2 `wte` LoRA to its head, so that is refused.
    """
    params = nn.meta.unbox(params)
    family = model_family or family_of(params)
    check_fits(params, adapters)
    flat_params = rules.flatten(params)
    entries: dict[str, dict] = {}
    dropouts, methods_seen = [], set()
    for path, ad in sorted(rules.flatten(adapters).items()):
        name = _method_name(ad)
        if name not in ("lora", "dora"):
            raise ValueError(f"adapter for {path!r} uses method {name!r}; PEFT LoRA files hold "
                             "'lora' and 'dora' adapters only (merge it and use save_hf).")
        if getattr(ad.method, "init_weights", None) == "pissa":
            raise ValueError(f"adapter for {path!r} is PiSSA: its base is the residual W - s·A0·B0, "
                             "which PEFT's base model is not; export the merged model with "
                             "lj.interop.save_hf instead.")
        if ad.layout.kind == "conv":
            raise ValueError(f"{path!r}: conv adapters are not part of GPT-2 / Llama.")
        methods_seen.add(name)
        dropouts.append(ad.dropout)
        module, scanned = hf_module(family, path)
        if ad.layout.n_stack != (1 if scanned else 0):
            raise ValueError(f"adapter for {path!r} has {ad.layout.n_stack} stacked axes; "
                             "expected one per scanned stack and none otherwise.")
        r = ad.rank
        alpha = ad.scale * (math.sqrt(r) if rslora else r)
        n = np.shape(ad.params["a"])[0] if scanned else 1
        for i in range(n):
            key = module.format(i) if scanned else module
            group = re.sub(rf"\.{_STACK[family]}\.\d+\.", f".{_STACK[family]}.{{}}.", key)
            entries[key] = dict(_to_peft(ad, i if scanned else None), r=r, alpha=alpha,
                                embed=ad.layout.kind == "embed", group=group)
    if len(methods_seen) > 1:
        raise ValueError("PEFT's use_dora is one flag per adapter file; these adapters mix LoRA "
                         "and DoRA: save them as two adapters.")
    untied = [p for p, a in rules.flatten(adapters).items()
              if a.layout.kind == "embed" and not a.tied_head]
    tie = False if untied else _tie_entries(family, params, entries)
    tensors = {}
    for key, e in entries.items():
        stem = f"{PREFIX}{key}."
        names = (("lora_embedding_A", "lora_embedding_B") if e["embed"]
                 else ("lora_A.weight", "lora_B.weight"))
        tensors[stem + names[0]], tensors[stem + names[1]] = e["A"], e["B"]
        if "m" in e:
            tensors[stem + "lora_magnitude_vector"] = e["m"]
    config = _peft_config(family, entries, flat_params, dropouts, methods_seen == {"dora"},
                          rslora, tie, base_model_name_or_path)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)



def _tie_entries(family, params, entries) -> bool:
    """Adds PEFT's tied `lm_head` factors for an adapted tied table; returns ensure_weight_tying."""
    if not _tied_head(family, params):
        return False
    table = "transformer.wte" if family == "gpt2" else "model.embed_tokens"
    if table not in entries:
        return False
    if family == "gpt2":
        raise ValueError(
            "the LoRA on GPT-2's 'wte' also adapts the tied LM head in lora_jax, but PEFT ties "
            "head adapters only for modules named embed_tokens/lm_head (ensure_weight_tying), so "
            "a PEFT GPT-2 would adapt the input embedding alone. Export the merged model with "
            "lj.interop.save_hf, or train without the wte adapter.")
    e = entries[table]
    entries["lm_head"] = dict(A=np.ascontiguousarray(e["B"].T), B=np.ascontiguousarray(e["A"].T),
                              r=e["r"], alpha=e["alpha"], embed=False, group="lm_head")
    return True


def _peft_config(family, entries, flat_params, dropouts, dora, rslora, tie, base_name) -> dict:
    counts = collections.Counter((e["r"], e["alpha"]) for e in entries.values())
    r, alpha = counts.most_common(1)[0][0]
    n_layers = _n_layers(family, flat_params)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for key, e in entries.items():
        if not (tie and key == "lm_head"):
            groups[e["group"]].append(key)
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for group, keys in sorted(groups.items()):
        suffix = _group_suffix(family, group)
        whole = "{}" not in group or len(keys) == n_layers
        targets.extend([suffix] if whole else sorted(keys))
        for field, pattern, default in (("r", rank_pattern, r), ("alpha", alpha_pattern, alpha)):
            values = {entries[k][field] for k in keys}
            if values == {default}:
                continue
            if whole and len(values) == 1:
                pattern[suffix] = _number(values.pop())
            else:
                pattern.update({k: _number(entries[k][field]) for k in sorted(keys)
                                if entries[k][field] != default})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name, "revision": None, "inference_mode": True,
        "r": int(r), "lora_alpha": _number(alpha), "target_modules": targets,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": bool(rslora), "use_dora": bool(dora),
        "lora_dropout": float(max(dropouts, default=0.0)),
        "fan_in_fan_out": family == "gpt2", "bias": "none", "lora_bias": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "exclude_modules": None, "ensure_weight_tying": tie,
    }


def _group_suffix(family: str, group: str) -> str:
    """'model.layers.{}.self_attn.q_proj' -> 'self_attn.q_proj'; top-level names stay whole."""
    if "{}" in group:
        return group.split("{}.", 1)[1]
    return group.split(".")[-1]


def _n_layers(family: str, flat_params: Mapping[str, Any]) -> int:
    stack = _STACK[family]
    idx = {m.group(1) for p in flat_params if (m := re.match(rf"{stack}_(\d+)/", p))}
    if idx:
        return len(idx)
    leaf = next(v for p, v in flat_params.items() if p.startswith(stack + "/"))
    return int(np.shape(leaf)[0])


def _number(x: float) -> int | float:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


# ----------------------------------------------------------------------------- loading


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's `get_pattern_key` rule: first key k with re.match(rf'(.*\\.)?({k})$', module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory!r}: pass a PEFT adapter directory.")
    with open(path) as fh:
        cfg = json.load(fh)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is unsupported; only LORA.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r} (trained biases) is unsupported; "
                         "lora_jax reads bias='none' adapters.")
    if cfg.get("init_lora_weights") in ("olora",):
        raise ValueError(f"{path}: init_lora_weights='olora' changes the base weights; "
                         "unsupported.")
    unsupported = sorted(k for k, v in cfg.items() if k not in _HARMLESS and v)
    if unsupported:
        raise ValueError(f"{path}: PEFT features {unsupported} are unsupported by lora_jax "
                         "(supported: LoRA, rsLoRA, DoRA, rank_pattern/alpha_pattern, embeddings, "
                         "ensure_weight_tying).")
    return cfg


def _read_weights(directory: str) -> dict[str, dict[str, np.ndarray]]:
    """{hf module: {'A': ..., 'B': ..., 'm': ...}} from adapter_model.safetensors."""
    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            raise ValueError(
                f"{directory!r} has a pickled adapter_model.bin; lora_jax reads safetensors only "
                "(a pickle can run code). Convert it once where torch is installed:\n"
                "  python -c \"import torch; from safetensors.torch import save_file; "
                "save_file(torch.load('adapter_model.bin', weights_only=True), "
                "'adapter_model.safetensors', metadata={'format': 'pt'})\"")
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory!r}.")
    out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in load_file(path).items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{path}: key {key!r} lacks the prefix {PREFIX!r}; not a causal-LM "
                             "PEFT adapter.")
        key = key[len(PREFIX):]
        if key.endswith(".base_layer.weight"):
            continue  # a copy of the base embedding (save_embedding_layers=True); the base is ours
        for suffix, part in _SUFFIXES.items():
            if key.endswith("." + suffix):
                out[key[: -len(suffix) - 1]][part] = np.asarray(value, np.float32)
                break
        else:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA factor lora_jax knows "
                             f"(suffixes: {sorted(_SUFFIXES)}).")
    return dict(out)


def load_peft(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    layouts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Reads a PEFT LoRA/DoRA adapter directory into lora_jax adapters for `params`.

    Args:
      directory: with `adapter_config.json` and `adapter_model.safetensors` (PEFT's or ours).
      params: the base GPT-2 / Llama parameter tree (scanned or not) from `lora_jax.models`.
      layouts: `lj.trace_layouts(model, params, tokens)`; needed for the multi-axis kernels.
    Returns:
      Adapters as `lj.init_adapters` makes them, holding the file's factors; layers of a scanned
      stack absent from the file get B = 0 (no change).
    Raises:
      ValueError naming the module, shape or config feature that lora_jax cannot represent.
    """
    directory, params = os.fspath(directory), nn.meta.unbox(params)
    cfg = _read_config(directory)
    weights = _read_weights(directory)
    family = family_of(params)
    flat = rules.flatten(params)
    tie = _check_tied(family, params, cfg, weights)
    untie = _tied_head(family, params) and not tie and any(
        m in weights for m in ("transformer.wte", "model.embed_tokens"))
    use_dora = bool(cfg.get("use_dora"))
    ranks_alphas: dict[str, set] = collections.defaultdict(set)
    placed = []  # (our path, layer, module, factors)
    for module, factors in sorted(weights.items()):
        if tie and module == "lm_head":
            continue
        if set(factors) != ({"A", "B", "m"} if use_dora else {"A", "B"}):
            raise ValueError(f"{directory}: module {module!r} has factors {sorted(factors)}; "
                             f"expected A, B{' and the DoRA magnitude' if use_dora else ''}.")
        path, layer = _our_path(family, module, flat)
        r = factors["A"].shape[0]
        want = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        if r != want:
            raise ValueError(f"{directory}: {module!r} lora_A has rank {r}, but the config's "
                             f"r/rank_pattern give {want}.")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        ranks_alphas[path].add((r, float(alpha)))
        placed.append((path, layer, module, factors))
    rules_ = []
    for path, values in sorted(ranks_alphas.items()):
        if len(values) > 1:
            raise ValueError(f"the layers of the scanned stack {path!r} have different "
                             f"(rank, alpha) {sorted(values)} in the PEFT file; one scanned "
                             "adapter has one rank: load with scan_layers=False.")
        (r, alpha), = values
        rules_.append(Rule(re.escape(path), r, alpha))
    if not rules_:
        raise ValueError(f"{directory}: the adapter file holds no LoRA factors.")
    spec = LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(rules_),
                    dropout=float(cfg.get("lora_dropout") or 0.0),
                    method="dora" if use_dora else "lora", rslora=bool(cfg.get("use_rslora")),
                    tie_head=not untie)
    adapters = rules.flatten(init_adapters(params, spec, jax.random.key(0), layouts=layouts))
    arrays = {p: {k: np.array(v, np.float32) for k, v in a.params.items()}
              for p, a in adapters.items()}
    for p, a in adapters.items():  # scanned layers the file leaves out: B = 0 is no change
        if a.layout.n_stack and a.layout.kind != "embed":
            arrays[p]["b"][:] = 0.0
        elif a.layout.n_stack:
            arrays[p]["a"][:] = 0.0
    for path, layer, module, factors in placed:
        _place(arrays[path], adapters[path], layer, module, factors)
    out = {p: dataclasses.replace(a, params={k: jax.numpy.asarray(v) for k, v in arrays[p].items()})
           for p, a in adapters.items()}
    return rules.unflatten(out)


def _place(arrays: dict, adapter, layer: int | None, module: str, factors: dict) -> None:
    """Writes one module's PEFT factors into our (possibly stacked) a, b, m arrays in place."""
    lay = adapter.layout
    r = adapter.rank
    expected = {"A": (r, lay.d_in), "B": (lay.d_out, r), "m": (lay.d_out,)}
    for part, x in factors.items():
        if x.shape != expected[part]:
            what = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}[part]
            raise ValueError(f"{module!r}: {what} has shape {x.shape}, but the model's kernel "
                             f"{lay.kernel_shape} needs {expected[part]}.")
    values = {"a": factors["A"].T.reshape(lay.in_shape + (r,)),
              "b": factors["B"].T.reshape((r,) + lay.out_shape)}
    if "m" in factors:
        values["m"] = factors["m"].reshape(lay.out_shape)
    for k, v in values.items():
        if layer is None:
            arrays[k][...] = v
        else:
            arrays[k][layer] = v


def _check_tied(family, params, cfg, weights) -> bool:
    """True when the file's head factors are PEFT's tied copy of the table's (then skipped)."""
    if not _tied_head(family, params):
        return False
    table = "transformer.wte" if family == "gpt2" else "model.embed_tokens"
    if table not in weights:
        return False
    ties = bool(cfg.get("ensure_weight_tying")) and table.split(".")[-1] in _PEFT_TIEABLE
    if not ties:  # PEFT's default: the head stays on the base table (LoraSpec(tie_head=False))
        return False
    head = weights.get("lm_head")
    emb = weights[table]
    if head is not None and not (np.array_equal(head.get("A"), emb["B"].T)
                                 and np.array_equal(head.get("B"), emb["A"].T)):
        raise ValueError("ensure_weight_tying is set but the file's lm_head factors are not the "
                         "transposed embed_tokens factors.")
    return True


# ----------------------------------------------------------------------------- merged export


def save_hf(
    directory: str | os.PathLike,
    merged_params: Mapping[str, Any],
    config: GPT2Config | LlamaConfig,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 10**9,
) -> list[str]:
    """Writes merged params as a Hugging Face checkpoint that `from_pretrained` loads.

    Args:
      directory: created if missing; gets `config.json` and `model.safetensors`, or shards
        `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` past
        `max_shard_bytes` (5 GB, HF's default).
      merged_params: `lj.merge(params, adapters)` (scanned or not, unboxed).
      config: the model's `GPT2Config` / `LlamaConfig`.
      dtype: 'float32' or 'bfloat16' for the stored tensors.
    Returns:
      The safetensors file names written.
    """
    hf_cfg = hf_models.config_to_hf(config, dtype=dtype)
    tensors = hf_models.params_to_hf(config, jax.device_get(merged_params), dtype=dtype)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(hf_cfg, fh, indent=2, sort_keys=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"),
                  metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
    return files
