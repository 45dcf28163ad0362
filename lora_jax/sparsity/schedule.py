"""LoSA's dynamic schedule over a model with sparse adapters, and its hook into the trainer.

One iteration ``t`` of ``T`` (``losa_iteration``): merge the adapters into the base; take the
cubic-ramp target ``s_t``; layer-wise sparsities from representation mutual information (linear
CKA between block inputs of the merged model on calibration samples -> importance -> the LP in
the band ``±delta``); prune the merged weights block by block at those rates (Wanda, SparseGPT or
magnitude), measuring each block's reconstruction error ``E_l`` against the dense model's block
outputs; unmerge with the new mask (kept base entries come back unchanged); then allocate ranks
``∝ E_l`` around the mean rank ``r̄_t = rank_start + (t-1) * rank_step`` (the reference: 6, 7, ..,
10) and write them into the fixed-size rank masks. Only adapter *state* and the frozen base
change, so the jitted train step is reused. ``LosaHook`` runs iteration t before the first step
of training segment t (the step budget split evenly over T), saves what it produced so that a
resumed run restores it, and adds ``sparsity`` and the per-iteration log to ``summary.json``.
The adapter math is in ``methods/sparse.py``, the pure schedule math in ``losa.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import io, rules, sharding, transform
from lora_jax.data import Rows
from lora_jax.methods import Adapter
from lora_jax.sparsity import losa
from lora_jax.sparsity.model import Blocks, capture_blocks, prune_blocks, run_blocks


@dataclasses.dataclass(frozen=True)
class LosaOptions:
    """LoSA's knobs (the ``lj.methods.losa`` method holds the same names)."""

    target: float = 0.5
    iterations: int = 5
    pruner: str = "wanda"
    pattern: tuple[int, int] | None = None
    beta: float = 1.0
    layerwise: bool = True
    rank_start: int = 6
    rank_step: int = 1
    rank_min: int = 1
    dynamic_rank: bool = True
    masked: bool = True
    rank_cap: int = 0
    mask_from: str = "pruner"

    @classmethod
    def from_method(cls, sc) -> "LosaOptions":
        """From an ``lj.methods.losa(...)`` method."""
        pattern = None
        if sc.pattern:
            n, _, m = sc.pattern.partition(":")
            pattern = (int(n), int(m))
        return cls(target=sc.target, iterations=sc.iterations, pruner=sc.pruner, pattern=pattern,
                   beta=sc.beta, layerwise=sc.layerwise, rank_start=sc.rank_start,
                   rank_step=sc.rank_step, dynamic_rank=sc.dynamic_rank, masked=sc.masked,
                   rank_cap=sc.rank_cap, mask_from=sc.mask_from)


def iteration_sparsity(opts: LosaOptions, t: int) -> float:
    """Mean sparsity after iteration t (1-based): the cubic ramp, or the pattern's N:M rate."""
    if opts.pattern is not None:
        return 1.0 - opts.pattern[0] / opts.pattern[1]
    return losa.cubic_sparsity(opts.target, t, opts.iterations)


def _with_states(adapters, update: Callable[[str, Adapter], dict]):
    flat = rules.flatten(adapters)
    return rules.unflatten({p: dataclasses.replace(a, state=update(p, a)) for p, a in flat.items()})


def losa_iteration(params, adapters, x0: jax.Array, blocks: Blocks, layouts,
                   dense_outputs: Sequence[jax.Array], t: int, opts: LosaOptions,
                   batch_size: int = 16) -> tuple[dict, dict, dict]:
    """One LoSA iteration (see the module docstring).

    Args:
      params: the frozen (sparse) base; adapters: 'losa' adapters (joined: params and state).
      x0: (n, seq, d) block-0 inputs of the calibration samples (embeddings do not change).
      blocks, layouts: ``capture_blocks`` / ``lj.trace_layouts`` of the model.
      dense_outputs: (L,) block outputs of the dense model on the same samples.
      t: 1-based iteration; opts: ``LosaOptions``.
    Returns:
      ``(params, adapters, info)``: the new base, adapters with new masks and rank masks, and a
      JSON-able record (target, layer sparsities, importances, errors, ranks).
    """
    paths = sorted(rules.flatten(adapters))
    merged = transform.merge(params, adapters)
    s_t = iteration_sparsity(opts, t)
    num = len(blocks.names)
    importance = None
    if opts.layerwise and opts.pattern is None and num > 1:
        xs = run_blocks(blocks, merged, x0, batch_size)[:-1]
        importance = losa.rmi_importance(xs, opts.beta)
        rates = losa.allocate_sparsity(importance, s_t, losa.sparsity_band(s_t))
    else:
        rates = np.full(num, s_t)
    pruned, masks, errors = prune_blocks(blocks, merged, x0, paths, layouts, list(rates),
                                         opts.pruner, opts.pattern, dense_outputs, batch_size)

    flat_pruned = rules.flatten(pruned)

    def new_mask(path, a):
        if not opts.masked:
            return {**a.state, "mask": jnp.ones_like(masks[path])}
        if opts.mask_from == "nonzero":  # the reference's W != 0: earlier zeros stay frozen
            return {**a.state, "mask": flat_pruned[path] != 0}
        return {**a.state, "mask": masks[path]}

    adapters = _with_states(adapters, new_mask)
    params = transform.unmerge(pruned, adapters)  # new mask, old rank masks: kept entries return
    r_max = max(a.rank for a in rules.flatten(adapters).values())
    mean_rank = min(opts.rank_start + (t - 1) * opts.rank_step, r_max)
    if opts.dynamic_rank:
        ranks = losa.allocate_ranks(errors, mean_rank, r_max, opts.rank_min)
    else:
        ranks = [r_max] * num
    if opts.rank_cap:  # the reference slices lora_A[:rank] of r = 8 adapters
        ranks = [min(int(r), opts.rank_cap) for r in ranks]

    def new_ranks(path, a):
        rm = losa.rank_mask(ranks[blocks.index(path)], a.rank)
        return {**a.state, "rank_mask": jnp.broadcast_to(rm, a.state["rank_mask"].shape)}

    adapters = _with_states(adapters, new_ranks)
    info = {"iteration": t, "target": float(s_t), "layer_sparsity": [float(r) for r in rates],
            "importance": None if importance is None else [float(v) for v in importance],
            "errors": [float(e) for e in errors], "mean_rank": int(mean_rank), "ranks": ranks}
    return params, adapters, info


def merged_sparsity(params, adapters) -> float:
    """Measured sparsity (fraction of exact zeros) of the adapted kernels after merging."""
    return _zero_fraction(transform.merge(params, adapters), list(rules.flatten(adapters)))


def _zero_fraction(params, paths) -> float:
    """Fraction of exact zeros over the kernels at ``paths`` (counted per kernel under jit, so
    sharded kernels are never gathered and no count overflows int32)."""
    flat = rules.flatten(params)
    kernels = [flat[p] for p in paths]
    zeros = jax.jit(lambda ks: [jnp.sum(k == 0) for k in ks])(kernels)
    return sum(int(z) for z in zeros) / sum(int(k.size) for k in kernels)


def segment_starts(steps: int, iterations: int) -> list[int]:
    """First step (1-based) of each of the T training segments; steps split evenly."""
    return [(t * steps) // iterations + 1 for t in range(iterations)]


class LosaHook:
    """Runs LoSA's iterations between training segments of ``train_and_evaluate``.

    ``frozen = hook(step, trainable, frozen)`` before each train step applies the iterations
    whose segment starts at ``step`` (several if the budget has fewer steps than T). Values
    change, shapes/dtypes/shardings do not, so the step does not recompile.
    """

    def __init__(self, opts: LosaOptions, model, frozen, calib_inputs: Sequence[jax.Array],
                 steps: int, workdir: str | os.PathLike, evaluate: Callable | None = None,
                 batch_size: int = 16, log: Callable[[str], None] = print):
        """``calib_inputs``: the model's positional inputs for the calibration rows, in the data
        kind's order (``(tokens,)``; packed rows: ``(tokens, segment_ids)``), each (n, seq)."""
        self.opts, self.log, self.evaluate, self.batch_size = opts, log, evaluate, batch_size
        self.dir = Path(workdir) / "losa"
        self.starts = segment_starts(steps, opts.iterations)
        params = frozen["params"]
        self.layouts = transform.trace_layouts(model, params, *(x[:1] for x in calib_inputs))
        self.blocks, self.x0 = capture_blocks(model, params, *calib_inputs)
        # The dense reference: the base before any pruning (adapters start with B = 0).
        self.dense_outputs = run_blocks(self.blocks, params, self.x0, batch_size)[1:]
        self.records: list[dict] = []

    def _due(self, step: int) -> list[int]:
        return [t + 1 for t, s in enumerate(self.starts) if s == step]

    def __call__(self, step: int, trainable, frozen):
        for t in self._due(step):
            frozen = self.run(t, trainable, frozen)
        return frozen

    def run(self, t: int, trainable, frozen):
        start = time.perf_counter()
        adapters = transform.join(trainable, frozen["state"])
        params, adapters, info = losa_iteration(frozen["params"], adapters, self.x0,
                                                self.blocks, self.layouts, self.dense_outputs,
                                                t, self.opts, self.batch_size)
        _, state = transform.split(adapters)
        new = _like(frozen, {**frozen, "params": params, "state": state})
        info["seconds"] = time.perf_counter() - start
        info["sparsity"] = merged_sparsity(params, adapters)
        if self.evaluate is not None:
            ev = self.evaluate(trainable, new)
            info["eval_after_prune"] = {"loss": ev["loss"], "accuracy": ev["accuracy"]["mean"]}
        self.records.append(info)
        self._save(t, new, info)
        self.log(f"LoSA iteration {t}/{self.opts.iterations}: sparsity {info['sparsity']:.4f} "
                 f"(target {info['target']:.4f}), mean rank {info['mean_rank']}, ranks "
                 f"{info['ranks']}, errors {np.round(info['errors'], 4).tolist()}"
                 + (f", eval loss {info['eval_after_prune']['loss']:.4f} acc "
                    f"{info['eval_after_prune']['accuracy']:.3f}" if self.evaluate else "")
                 + f" ({info['seconds']:.1f}s)")
        return new

    def _save(self, t: int, frozen, info: dict) -> None:
        """Every process: the pruned base and the adapters' state in ``losa/<t>/``, each process
        writing its shards (``io.save_params``); process 0 writes the log, ``losa/<t>.json``."""
        io.save_params(self.dir / str(t), _saved(frozen))
        if jax.process_index() == 0:
            io.atomic_write(self.dir / f"{t}.json", json.dumps(info).encode())

    def restore(self, step: int, frozen):
        """The frozen tree as it was after the iterations applied by ``step`` (0: unchanged),
        read straight into ``frozen``'s shardings."""
        done = [t + 1 for t, s in enumerate(self.starts) if s <= step]
        if not done:
            return frozen
        t = done[-1]
        saved = io.load_params(self.dir / str(t), like=_saved(frozen))
        self.records = [io.read_json(self.dir / f"{i}.json", "delete the workdir's losa/ and "
                                     "checkpoints/ to rerun") for i in done]
        state = rules.unflatten({p: dataclasses.replace(a, state=saved["state"][p])
                                 for p, a in rules.flatten(frozen["state"]).items()})
        self.log(f"LoSA: restored iteration {t} from {self.dir}")
        return {**frozen, "params": saved["params"], "state": state}

    def finish(self, trainable, frozen, workdir: str | os.PathLike) -> dict:
        """Writes the merged sparse model (``merged/``, read with ``io.load_params``); returns
        summary entries. Every process calls it: the merge runs under jit, sharded like the base,
        and each process writes its shards (``io.save_params``)."""
        adapters = transform.join(trainable, frozen["state"])
        merged = sharding.merge_sharded(frozen["params"], adapters)
        paths = list(rules.flatten(adapters))
        io.save_params(Path(workdir) / "merged", merged)
        return {"sparsity": _zero_fraction(merged, paths),
                "base_sparsity": _zero_fraction(frozen["params"], paths), "losa": self.records}


def _saved(frozen) -> dict:
    """What an iteration saves: the base and each adapter's state, keyed by kernel path."""
    return {"params": frozen["params"],
            "state": {p: a.state for p, a in rules.flatten(frozen["state"]).items()}}


def _like(old, new):
    """``new`` with each array placed like the corresponding leaf of ``old`` (same sharding)."""
    def place(n, o):
        n = jnp.asarray(n, dtype=o.dtype)
        return jax.device_put(n, o.sharding) if hasattr(o, "sharding") else n
    return jax.tree.map(place, new, old)


def trainer_hook(method, run) -> LosaHook:
    """The ``LosaHook`` of an ``lj.methods.losa`` method in a training ``run`` (methods.Run).

    Calibration: ``method.calib_samples`` training rows drawn with ``run.seed``, given to the
    model as the data kind's inputs (``run.inputs``: the ``segment_ids`` of packed rows too, so
    activations stay within an example). ``run.evaluate(trainable, frozen) -> {'loss',
    'accuracy': {'mean'}}`` is logged after each prune. The hook is built lazily by ``restore``
    (it needs the frozen base).
    """
    train = Rows.of(run.train_arrays)  # builds only the calibration rows
    rows = np.sort(np.random.default_rng(run.seed).permutation(train.num_rows)
                   [:method.calib_samples])
    calib = train.take(rows)
    return _LazyHook(LosaOptions.from_method(method), run,
                     tuple(jnp.asarray(calib[k]) for k in run.inputs))


class _LazyHook:
    """``LosaHook`` built from the frozen tree when the loop first hands it over (``restore``)."""

    def __init__(self, opts: LosaOptions, run, calib_inputs):
        self.opts, self.run, self.calib, self.hook = opts, run, calib_inputs, None

    def restore(self, step: int, frozen):
        r = self.run
        self.hook = LosaHook(self.opts, r.model, frozen, self.calib, r.steps, r.workdir,
                             r.evaluate, log=r.log)
        return self.hook.restore(step, frozen)

    def __call__(self, step: int, trainable, frozen):
        return self.hook(step, trainable, frozen)

    def finish(self, trainable, frozen, workdir) -> dict:
        return self.hook.finish(trainable, frozen, workdir)
