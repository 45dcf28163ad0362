"""A Hugging Face checkpoint read straight into its shards: no host holds a whole model.

`load_hf_sharded(dir, mesh, rules)` is `lora_jax.models.hf.load_hf_checkpoint` for a mesh: the
shardings come first, from the module's abstract init (`jax.eval_shape`) and the logical rules;
then every parameter is `jax.make_array_from_callback`, whose callback opens the safetensors file
lazily (`safe_open(...).get_slice`) and reads only the rows and columns of the shard asked for
(plus, where a converter reshapes one HF axis into several of ours and a trailing one of those is
sharded too, the rest of that HF range). A process therefore reads about the bytes of its own
devices' shards, one tensor at a time (each file is unmapped after every tensor, so the pages
a strided read touched do not accumulate). It reads GPT-2, Llama and BERT; a BERT head that the
checkpoint lacks is a jitted init with sharded outputs. The key maps (names, shapes, transposes
and reshapes) and their checks are hf.py's (`checkpoint_map`) and hf_bert.py's; what lives here
is only the slicing of a converted tensor back into HF coordinates.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lora_jax import sharding
from lora_jax.models import hf, hf_bert
from lora_jax.models.gpt2 import GPT2
from lora_jax.models.llama import Llama

SHARDED_FAMILIES = ("gpt2", "llama", "bert")


def _files(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{HF tensor name: (safetensors file, shape)}`` for a single file or a sharded index (the
    files' headers only)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as fh:
            files = sorted({os.path.join(path, v) for v in json.load(fh)["weight_map"].values()})
    else:
        raise FileNotFoundError(f"No weights in {path!r}: expected 'model.safetensors' or "
                                "'model.safetensors.index.json'")
    out = {}
    for file in files:
        with safe_open(file, "np") as f:
            out.update({k: (file, tuple(f.get_slice(k).get_shape())) for k in f.keys()})
    return out


def _transposes(convert) -> bool:
    """Whether hf.py's converter transposes the (2-D) HF tensor before reshaping it."""
    return convert is np.transpose or convert.__qualname__.startswith("_transpose_reshape")


def _groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[int]:
    """How many of ``dst``'s axes each of ``src``'s axes reshapes into (a row-major split)."""
    out, j = [], 0
    for n in src:
        k, size = 1, dst[j]
        while size < n:
            size *= dst[j + k]
            k += 1
        if size != n:
            raise ValueError(f"cannot split axes {src} into {dst} row-major")
        out.append(k)
        j += k
    return out


def read_block(handle, name: str, hf_shape, ours, transpose: bool, index) -> np.ndarray:
    """The block ``index`` (slices over ``ours``, our converted shape) of HF tensor ``name``.

    Our shape is ``reshape(T, ours)`` with ``T = hf.T if transpose else hf``; each axis of ``T``
    splits into consecutive axes of ours. Reads the range of ``T``'s axis covering the block's
    leading sliced axis of each group (whole trailing axes), then slices the rest in memory.
    """
    t_shape = tuple(hf_shape[::-1]) if transpose else tuple(hf_shape)
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, ours))
    t_index, inner = [], []
    j = 0
    for n, k in zip(t_shape, _groups(t_shape, tuple(ours))):
        group, sl = ours[j:j + k], index[j:j + k]
        step = math.prod(group[1:])
        t_index.append(slice(sl[0].start * step, sl[0].stop * step))
        inner.append((sl[0].stop - sl[0].start, *group[1:]))
        j += k
    hf_index = tuple(t_index[::-1]) if transpose else tuple(t_index)
    block = np.asarray(handle.get_slice(name)[hf_index])
    if transpose:
        block = block.T
    block = block.reshape(tuple(d for g in inner for d in g))
    rest = tuple(slice(None) if i in _leading(ours, t_shape) else s
                 for i, s in enumerate(index))
    return block[rest]


def _leading(ours, t_shape) -> set[int]:
    """Indices of our axes that lead their group (already sliced when read)."""
    out, j = set(), 0
    for k in _groups(tuple(t_shape), tuple(ours)):
        out.add(j)
        j += k
    return out


def _config(path: str) -> tuple[dict, str]:
    """The directory's ``config.json`` and its ``model_type``, one ``SHARDED_FAMILIES`` knows."""
    with open(os.path.join(path, "config.json")) as fh:
        hf_cfg = json.load(fh)
    family = hf_cfg.get("model_type")
    if family not in SHARDED_FAMILIES:
        raise ValueError(f"{path!r} is a {family!r} checkpoint; sharded loading knows "
                         f"{SHARDED_FAMILIES} (load others whole with hf.load_hf_checkpoint)")
    return hf_cfg, family


def hf_module(path: str, overrides: dict | None = None, **config):
    """The module of a Hugging Face directory, from its ``config.json`` alone (no weights read);
    ``config``: ``scan_layers``, ``remat``, ``dtype``, ``param_dtype``. ``overrides``: a BERT
    checkpoint's head and the fields it does not set (``hf_bert.bert_hf_module``'s; ``seed`` is
    ``load_hf_sharded``'s); GPT-2 and Llama set every field themselves and ignore them, as in
    ``hf.load_hf_checkpoint``."""
    hf_cfg, family = _config(path)
    if family == "bert":
        overrides = {k: v for k, v in (overrides or {}).items() if k != "seed"}
        return hf_bert.bert_hf_module(path, **config, **overrides)
    cfg = hf.config_from_hf(hf_cfg, **config)
    return GPT2(cfg) if family == "gpt2" else Llama(cfg)


def load_hf_sharded(path: str, mesh, rules, *, scan_layers: bool = False, remat: bool = False,
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    overrides: dict | None = None):
    """``(module, params)`` like ``hf.load_hf_checkpoint``, each array created in its shards.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      mesh, rules: ``sharding.make_mesh(...)``, ``sharding.logical_rules(...)``.
      overrides: a BERT checkpoint's head and fields (see ``hf_module``), and ``seed``, the PRNG
        seed of a head the checkpoint lacks (created by a jitted init in its shards).
    Returns:
      The module and its params (nested dict of ``jax.Array``s sharded by the rules); no host
      reads more of a tensor than its own devices' shards need (see the module docstring).
    """
    module = hf_module(path, overrides, scan_layers=scan_layers, remat=remat, dtype=dtype,
                       param_dtype=param_dtype)
    files = _files(path)
    key_map, stored = hf.checkpoint_map(module, {k: s for k, (_, s) in files.items()}, path)

    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = sharding.base_shapes(module, tokens, mesh, rules)
    out_sh = jax.tree.map(lambda x: x.sharding, shapes)

    params: dict = {}
    fresh = getattr(module.cfg, "head", "none") != "none" and "classifier.weight" not in key_map
    if fresh:  # a BERT head the checkpoint lacks
        params["classifier"] = hf_bert.fresh_head(module, (overrides or {}).get("seed", 0),
                                                  out_sh["classifier"])

    prefix = hf.STACK_PREFIX[_config(path)[1]]
    layer_name = re.compile(rf"{prefix}_(\d+)")

    def stacked(our):  # (layer or None, our path with a layer's name replaced by the stack's)
        for j, part in enumerate(our):
            if scan_layers and (m := layer_name.fullmatch(part)):
                return int(m.group(1)), (*our[:j], prefix, *our[j + 1:])
        return None, our

    by_path: dict[tuple, list] = {}  # our (stacked) path -> [(layer or None, hf name, entry)]
    for name, (our, hf_shape, convert) in key_map.items():
        layer, our = stacked(our)
        by_path.setdefault(our, []).append((layer, name, hf_shape, convert))

    handles: dict[str, Any] = {}  # open while one parameter is built, then closed (unmapped)

    def handle(file):
        if file not in handles:
            handles[file] = safe_open(file, "np")
        return handles[file]

    def build(entries, like, s):
        per_layer = entries[0][0] is not None
        ours = tuple(like.shape[1:] if per_layer else like.shape)
        entries = sorted(entries, key=lambda e: e[0] or 0)

        def one(entry, index):
            _, name, hf_shape, convert = entry
            block = read_block(handle(files[stored[name]][0]), stored[name], hf_shape, ours,
                               _transposes(convert), index)
            return block.astype(like.dtype)

        def callback(index):
            if not per_layer:
                return one(entries[0], index)
            layers = range(*index[0].indices(like.shape[0]))
            return np.stack([one(entries[i], index[1:]) for i in layers])

        return jax.make_array_from_callback(like.shape, s, callback)

    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_sh = jax.tree.leaves(out_sh)
    for (kp, like), s in zip(flat_shapes, flat_sh):
        our = tuple(k.key for k in kp)
        if fresh and our[0] == "classifier":
            continue
        if our not in by_path:
            raise ValueError(f"parameter {'/'.join(our)} of {type(module).__name__} has no HF "
                             "tensor in the key map")
        hf._set_path(params, our, build(by_path[our], like, s))  # noqa: SLF001
        handles.clear()  # the file's pages this tensor touched leave the process's memory
    return module, params
