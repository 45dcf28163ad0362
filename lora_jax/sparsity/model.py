"""Model-level pruning: walk a transformer's blocks over calibration batches, one block at a time.

A model's blocks are the top-level submodules named ``{prefix}_{i}`` (``h_i`` in GPT-2,
``layers_i`` in Llama); each maps the residual stream ``x -> (x', ...)``. ``capture_blocks``
runs the model once up to block 0 (a Flax method interceptor stops it there) and keeps an unbound
clone of that block plus its input and the side inputs the model gives every block (the attention
mask and positions: block-diagonal for packed rows with ``segment_ids``, so calibration
activations never mix examples); from then on each block is applied alone
(``block.apply({'params': params[name]}, x, None, side)``, one compiled function for all blocks),
with another interceptor recording the inputs of its linear layers. ``prune_blocks`` is the
sequential driver of SparseGPT/Wanda: block i's kernels are pruned from statistics of the inputs
it receives from the already-pruned blocks before it, all kernels of a block from one pass (as in
the reference code), and the pruned block's outputs feed block i+1. Multi-axis kernels are
pruned in their 2-D ``(d_in, d_out)`` view given by their ``Layout``. Unscanned stacks only
(``scan_layers=False``). The one-layer pruners live in ``pruners.py``, LoSA's schedule in
``schedule.py``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lora_jax import layers, rules
from lora_jax.sparsity import losa, pruners

PRUNERS = ("magnitude", "wanda", "sparsegpt")


class _Stop(Exception):
    pass


def block_names(params: Mapping[str, Any]) -> list[str]:
    """Top-level ``{prefix}_{i}`` entries of ``params`` in index order (``['h_0', 'h_1']``)."""
    found = [(m.group(1), int(m.group(2)), k) for k in params
             if (m := re.fullmatch(r"(.+)_(\d+)", k))]
    prefixes = {p for p, _, _ in found}
    if len(prefixes) != 1:
        raise ValueError(f"expected the blocks as top-level '<prefix>_<i>' params (e.g. 'h_0'), "
                         f"found prefixes {sorted(prefixes)} in {sorted(params)}; build the model "
                         "with scan_layers=False")
    return [k for _, _, k in sorted(found, key=lambda t: t[1])]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A model seen as its block stack for some calibration rows: an unbound block module, the
    blocks' param names, and what the model passes every block beside ``x`` for those rows
    (``(mask, positions, None)``; None: the block is called as ``block(x)``). Leaves of ``side``
    with the rows' leading size are sliced with ``x``; others (a (1, 1, T, T) causal mask) are
    shared."""

    module: nn.Module
    names: tuple[str, ...]
    side: Any = None

    def index(self, path: str) -> int:
        """Block index of a '/'-joined parameter path (``'h_3/attn/c_attn/kernel'`` -> 3)."""
        head = path.split("/", 1)[0]
        if head not in self.names:
            raise ValueError(f"{path!r} is not inside a block ({self.names[0]}..{self.names[-1]})")
        return self.names.index(head)


def capture_blocks(model: nn.Module, params, tokens: jax.Array, *inputs,
                   **kwargs) -> tuple[Blocks, jax.Array]:
    """``(blocks, x0)``: the block stack of ``model`` and block 0's input for ``tokens``.

    Args:
      model: a linen LM whose blocks are submodules ``{prefix}_{i}`` called as ``block(x)`` or
        ``block(x, None, side)``.
      params: its parameters; tokens: int (n, seq).
      inputs: the model's further positional inputs for the same rows, e.g. the ``segment_ids``
        (n, seq) of packed rows (``Kind.inputs`` order); kwargs: passed to the model too.
    """
    names = block_names(params)
    seen: dict[str, Any] = {}

    def catch(next_fun, args, kw, context):
        mod = context.module
        if context.method_name == "__call__" and mod.path == (names[0],):
            seen["module"], seen["x"] = mod.clone(parent=None, name=None), args[0]
            side = args[2] if len(args) > 2 else None
            if len(args) > 3 or kw or (len(args) > 1 and args[1] is not None) or not (
                    side is None or (isinstance(side, tuple) and len(side) == 3
                                     and side[2] is None)):
                raise ValueError(f"block {names[0]} is called with extra arguments; only "
                                 "block(x), block(x, None) or, for the KV-cache-aware models, "
                                 "block(x, None, (mask, positions, None)) are supported")
            seen["side"] = side
            raise _Stop
        return next_fun(*args, **kw)

    try:
        with nn.intercept_methods(catch):
            model.apply({"params": params}, tokens, *inputs, **kwargs)
    except _Stop:
        pass
    if "x" not in seen:
        raise ValueError(f"block {names[0]!r} was never called by the model")
    return Blocks(seen["module"], tuple(names), seen["side"]), seen["x"]


def _block_fn(module: nn.Module) -> Callable:
    """jitted ``(block_params, x, side) -> (y, {relative kernel path: layer input})``."""

    @jax.jit
    def run(p, x, side=None):
        inputs = {}

        def record(next_fun, args, kw, context):
            mod = context.module
            if context.method_name == "__call__" and args and mod.has_variable("params", "kernel"):
                inputs["/".join(mod.path + ("kernel",))] = args[0]
            return next_fun(*args, **kw)

        with nn.intercept_methods(record):
            out = module.apply({"params": p}, x) if side is None else \
                module.apply({"params": p}, x, None, side)
        return (out[0] if isinstance(out, tuple) else out), inputs

    return run


def run_blocks(blocks: Blocks, params, x: jax.Array, batch_size: int = 16) -> list[jax.Array]:
    """The inputs of every block and the final output: ``[x_0, ..., x_L]`` (each (n, seq, d))."""
    run = _block_fn(blocks.module)
    xs = [x]
    for name in blocks.names:
        xs.append(jnp.concatenate([run(params[name], xb, side)[0] for xb, side in
                                   _batches(xs[-1], blocks.side, batch_size)]))
    return xs


def _batches(x, side, batch_size):
    """``[(x rows, their side inputs), ...]`` in batches of ``batch_size`` rows."""
    n = x.shape[0]
    take = lambda i: jax.tree.map(lambda a: a[i:i + batch_size] if a.shape[0] == n else a, side)
    return [(x[i:i + batch_size], take(i)) for i in range(0, n, batch_size)]


def _as_2d(layout: layers.Layout, kernel):
    return layers.to_canonical(layout, kernel).reshape(layout.d_in, layout.d_out)


def _from_2d(layout: layers.Layout, w2):
    return layers.from_canonical(layout, w2.reshape(layout.in_shape + layout.out_shape))


def _rows(layout: layers.Layout, x):
    x_spec, rest = layout.xa.split(",")
    ins = rest.split("->")[0].replace(layers.R, "")
    if not x_spec.endswith(ins):
        raise ValueError(f"layer inputs contract non-trailing axes ({layout.xa}); not supported")
    return x.reshape(-1, layout.d_in)


def prune_kernel(w2, stats: pruners.CalibStats, sparsity: float | None, pruner: str,
                 pattern=None):
    """One (d_in, d_out) kernel with the named pruner; returns ``(w_pruned, keep_mask)``."""
    if pruner == "magnitude":
        return pruners.magnitude_prune(w2, sparsity, pattern)
    if pruner == "wanda":
        return pruners.wanda_prune(w2, stats.col_norm_sq, sparsity, pattern)
    if pruner == "sparsegpt":
        return pruners.sparsegpt_prune(w2, stats.hessian, sparsity, pattern,
                                       blocksize=min(128, w2.shape[0]))
    raise ValueError(f"unknown pruner {pruner!r}; use one of {PRUNERS}")


def prune_blocks(
    blocks: Blocks,
    params: Mapping[str, Any],
    x0: jax.Array,
    paths: Sequence[str],
    layouts: Mapping[str, layers.Layout],
    sparsities: Sequence[float],
    pruner: str = "wanda",
    pattern: tuple[int, int] | None = None,
    dense_outputs: Sequence[jax.Array] | None = None,
    batch_size: int = 16,
) -> tuple[dict, dict, list[float] | None]:
    """Sequential pruning of the kernels at ``paths``, block by block.

    Args:
      blocks, x0: from ``capture_blocks`` (x0: (n, seq, d) calibration block-0 inputs).
      params: the model's parameters (not modified).
      paths: '/'-joined kernel paths to prune; each inside a block.
      layouts: ``{path: Layout}`` (``lj.trace_layouts``).
      sparsities: (L,) per-block sparsity (ignored with a ``pattern``).
      pruner: 'magnitude' | 'wanda' | 'sparsegpt'; pattern: None or (n, m).
      dense_outputs: optional (L,) block outputs of the dense model on the same samples; then the
        per-block ``losa.reconstruction_error`` of the pruned outputs is returned.
      batch_size: calibration sequences per forward pass (statistics accumulate over batches).
    Returns:
      ``(params, masks, errors)``: pruned params, ``{path: bool keep-mask (kernel shape)}``, and
      the (L,) errors or None.
    """
    if len(sparsities) != len(blocks.names):
        raise ValueError(f"got {len(sparsities)} sparsities for {len(blocks.names)} blocks")
    flat = rules.flatten(params)
    per_block: dict[int, list[str]] = {}
    for path in paths:
        per_block.setdefault(blocks.index(path), []).append(path)
    run = _block_fn(blocks.module)
    masks, errors, x = {}, [], x0
    for i, name in enumerate(blocks.names):
        mine = per_block.get(i, [])
        stats = {p: pruners.init_calib_stats(layouts[p].d_in) for p in mine}
        if pruner != "magnitude":
            for xb, side in _batches(x, blocks.side, batch_size):
                _, inputs = run(params_of(flat, name), xb, side)
                for p in mine:
                    stats[p] = pruners.update_calib_stats(
                        stats[p], _rows(layouts[p], inputs[p.split("/", 1)[1]]))
        for p in mine:
            w2, keep = prune_kernel(_as_2d(layouts[p], flat[p]), stats[p],
                                    None if pattern else float(sparsities[i]), pruner, pattern)
            flat[p] = _from_2d(layouts[p], w2).astype(flat[p].dtype)
            masks[p] = _from_2d(layouts[p], keep)
        x = jnp.concatenate([run(params_of(flat, name), xb, side)[0]
                             for xb, side in _batches(x, blocks.side, batch_size)])
        if dense_outputs is not None:
            errors.append(float(losa.reconstruction_error(dense_outputs[i], x)))
    return rules.unflatten(flat), masks, (errors if dense_outputs is not None else None)


def params_of(flat: Mapping[str, Any], name: str) -> dict:
    """The nested params of block ``name`` from a flat '/'-keyed tree."""
    head = name + "/"
    return rules.unflatten({k[len(head):]: v for k, v in flat.items() if k.startswith(head)})


def prune_model(model: nn.Module, params, tokens: jax.Array, sparsity: float | None,
                pruner: str = "wanda", pattern: tuple[int, int] | None = None,
                targets: Sequence[str] = ("all-linear",), batch_size: int = 16):
    """One-shot pruning of every targeted kernel at one ``sparsity`` (or an N:M ``pattern``).

    Example:
      >>> params, masks = prune_model(model, params, calib_tokens, 0.5, 'sparsegpt')
    Returns ``(params, masks)`` with bool keep-masks keyed by kernel path.
    """
    from lora_jax import transform

    params = nn.meta.unbox(params)
    layouts = transform.trace_layouts(model, params, tokens[:1])
    paths = [t.path for t in rules.select_targets(params, targets, rank=1, alpha=1.0)]
    blocks, x0 = capture_blocks(model, params, tokens)
    rates = [sparsity if sparsity is not None else 0.0] * len(blocks.names)
    params, masks, _ = prune_blocks(blocks, params, x0, paths, layouts, rates, pruner, pattern,
                                    batch_size=batch_size)
    return params, masks


def measured_sparsity(params, paths: Sequence[str]) -> float:
    """Fraction of exact zeros over the kernels at ``paths``."""
    flat = rules.flatten(params)
    zeros = sum(int(np.sum(np.asarray(flat[p]) == 0)) for p in paths)
    return zeros / max(sum(int(np.size(flat[p])) for p in paths), 1)
