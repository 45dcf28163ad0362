"""The parameter-tree transform: init adapters, inject them into a forward pass, merge, unmerge.

Adapters are a pytree of ``Adapter`` nodes keyed by the paths of the kernels they adapt (a nested
dict mirroring ``params``). ``apply`` runs an unmodified Flax linen model with the adapters in a
``'lora'`` variable collection and intercepts the targeted layers (``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Embed``, ``nn.Conv``), adding each adapter's factored
contribution; because they live in a collection, ``nn.scan``-ed stacks slice them like
``'params'`` (declare ``'lora'`` in the scan's ``variable_axes``). ``merge``/``unmerge`` fold
adapters into the base and out again, which is also the materialised mode that works for any JAX
function of the parameters. Kernels quantised by ``lj.quantize_params`` (QLoRA) are dequantised
inside their layer, adapted or not, so ``apply`` (not ``model.apply``) runs quantised models.
Rules live in ``rules.py``, the math in ``methods/``, quantised storage in ``quant/``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from lora_jax import layers, methods, quant, rules
from lora_jax.methods import Adapter, Ctx, is_adapter
from lora_jax.methods.saved import Saved


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how.

    Attributes:
      rank: default rank r (a ``rules.Rule`` may override it per pattern).
      alpha: default alpha; the scale is alpha/r, or alpha/√r with ``rslora``.
      targets: ordered rules (regex strings, preset names 'qv'/'attn'/'all-linear', or ``Rule``s);
        full match against '/'-joined parameter paths, first match wins.
      exclude: regexes of paths never adapted.
      dropout: dropout rate on the adapter branch's input (training only).
      method: a method object (``lj.methods.lora()``, ``lj.methods.dora(init_weights='pissa')``,
        a user's registered method) or a registered name with default hyperparameters.
      rslora: use alpha/√r scaling.
      modules_to_save: regexes of (non-adapted) parameters trained fully, as a delta on the base.
      tie_head: a LoRA on an embedding table that the LM head shares (``nn.Embed.attend``, e.g.
        GPT-2's ``wte``) also adapts the head (True, the default: factored == merged, PEFT's
        ``ensure_weight_tying=True``), or leaves the head on the base table (False: PEFT's
        default). With False, merging the table changes the head too, so export such a model
        with an untied head (``lj.interop.save_hf`` for Llama) or keep the adapter factored.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("qv",)
    exclude: tuple = ()
    dropout: float = 0.0
    method: Any = "lora"
    rslora: bool = False
    modules_to_save: tuple = ()
    tie_head: bool = True

    def __post_init__(self):
        object.__setattr__(self, "method", methods.make(self.method))

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _unbox(params):
    return nn.meta.unbox(params)


def _check_rank(path: str, rank: int, layout: layers.Layout) -> None:
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank} for {path!r}")
    limit = min(layout.d_in, layout.d_out)
    if rank > limit:
        raise ValueError(
            f"rank {rank} for {path!r} exceeds min(d_in, d_out) = {limit} "
            f"(kernel {layout.kernel_shape})"
        )


def _layout_for(path: str, kernel, layouts: Mapping[str, layers.Layout] | None):
    if layouts and path in layouts:
        layout = layouts[path]
        n_stack = kernel.ndim - len(layout.kernel_shape)
        if n_stack < 0 or tuple(kernel.shape[n_stack:]) != layout.kernel_shape:
            raise ValueError(
                f"{path!r} has shape {kernel.shape} but its traced layout expects "
                f"{layout.kernel_shape} per layer"
            )
        return layout.stacked(n_stack)
    return layers.layout_of_param(path, kernel.shape)


def init_adapters(
    params: Mapping[str, Any],
    spec: LoraSpec,
    key: jax.Array,
    *,
    layouts: Mapping[str, layers.Layout] | None = None,
) -> dict[str, Any]:
    """Creates adapters for the kernels ``spec`` selects.

    Args:
      params: the base parameter tree (boxed logical-partitioning metadata is unboxed).
      spec: the ``LoraSpec``.
      key: PRNG key.
      layouts: per-path kernel layouts from ``trace_layouts``; needed for kernels other than 2-D
        Dense kernels and Embed tables (DenseGeneral, Einsum, Conv, scanned stacks).
    Returns:
      A nested dict mirroring ``params`` with an ``Adapter`` at each selected path. A method
      with a base transform (PiSSA: ``lj.methods.lora(init_weights='pissa')``) then needs
      ``params, adapters = lj.transform_base(params, adapters)``.

    Example:
      >>> spec = lj.LoraSpec(rank=8, alpha=16.0, targets=(r".*/(query|value)/kernel",))
      >>> adapters = lj.init_adapters(params, spec, jax.random.key(0))
    """
    params = _unbox(params)
    flat = rules.flatten(params)
    targets = rules.select_targets(params, spec.targets, rank=spec.rank, alpha=spec.alpha,
                                   exclude=spec.exclude)
    out: dict[str, Adapter] = {}
    keys = jax.random.split(key, max(len(targets), 1))
    for k, t in zip(keys, targets):
        kernel = flat[t.path]
        layout = _layout_for(t.path, kernel, layouts)
        _check_rank(t.path, t.rank, layout)
        if quant.is_quantized(kernel):  # QLoRA: init over the quantised weights
            kernel = quant.dequantize(kernel, kernel.dtype)
        out[t.path] = spec.method.init(k, kernel, layout, t.rank, spec.scale(t.rank, t.alpha),
                                       spec.dropout)
        if layout.kind == "embed" and not spec.tie_head:
            out[t.path] = dataclasses.replace(out[t.path], tied_head=False)
    if spec.modules_to_save:
        saved = rules.match_rules(sorted(flat), rules.as_rules(spec.modules_to_save),
                                  what="modules_to_save pattern")
        for path in saved:
            if path in out:
                raise ValueError(f"{path!r} is both an adapter target and in modules_to_save")
            shape = tuple(flat[path].shape)
            layout = layers.Layout("full", (), shape, shape)
            out[path] = Saved().init(None, flat[path], layout, 0, 1.0, 0.0)
    return rules.unflatten(out)


def trace_layouts(model: nn.Module, params: Mapping[str, Any], *args, **kwargs) -> dict:
    """Kernel layouts of every adaptable layer, from an abstract trace of one forward pass.

    Runs ``model.apply({'params': params}, *args, **kwargs)`` under ``jax.eval_shape`` (nothing is
    computed) and records, for each Dense/DenseGeneral/Einsum/Embed/Conv call, which kernel axes
    are contracted with the input. Stacked (``nn.scan``) axes are those the stored kernel has
    beyond what the layer sees. Quantised kernels are traced at their logical shape. Returns
    ``{path: Layout}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_layouts traces a linen module, got {type(model).__name__}; for an "
                        "NNX model use layouts=lj.nnx.layouts(model)")
    found: dict[str, layers.Layout] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and call_args:
            for name in ("kernel", "embedding"):
                if module.has_variable("params", name):
                    shape = jnp.shape(module.get_variable("params", name))
                    layout = layers.layout_of_module(module, call_args[0], tuple(shape))
                    if layout is not None:
                        found["/".join(module.path + (name,))] = layout
        return next_fun(*call_args, **call_kwargs)

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _unbox(params),
                          is_leaf=quant.is_quantized)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: model.apply({"params": p}, *args, **kwargs), params)
    flat = rules.flatten(params)
    return {path: _layout_for(path, flat[path], found) for path in found if path in flat}


# ----------------------------------------------------------------------------- the forward pass

_CTX: contextvars.ContextVar[Ctx] = contextvars.ContextVar("lora_jax_ctx", default=Ctx())


@contextlib.contextmanager
def _context(ctx: Ctx):
    token = _CTX.set(ctx)
    try:
        yield
    finally:
        _CTX.reset(token)


def _kernel_name(module: nn.Module) -> str | None:
    for name in ("kernel", "embedding"):
        if module.has_variable("params", name):
            return name
    return None


def _dropout(module: nn.Module, x, rate: float):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _check_shape(module: nn.Module, kernel, adapter: Adapter) -> None:
    if tuple(kernel.shape) != adapter.layout.kernel_shape:
        raise ValueError(
            f"adapter for {'/'.join(module.path)!r} was made for a kernel of shape "
            f"{adapter.layout.kernel_shape}, but the layer's kernel has shape {kernel.shape}"
        )


def _dequantized(module: nn.Module, name: str):
    """The layer's own params with its quantised kernel dense in the compute dtype, or None."""
    own = dict(module.variables.get("params", {}))
    if not quant.is_quantized(own[name]):
        return None
    own[name] = quant.dequantize(own[name], getattr(module, "dtype", None) or own[name].dtype)
    return own


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    name = _kernel_name(module) if context.method_name != "setup" else None
    dense = _dequantized(module, name) if name else None
    if dense is not None:  # QLoRA: run the layer on its dequantised params
        base = module.clone(parent=None)
        next_fun = lambda *a, **k: base.apply({"params": dense}, *a, method=context.method_name,
                                             **k)
    if (context.method_name == "attend" and name and module.has_variable("lora", name)
            and module.get_variable("lora", name).tied_head):
        # A tied LM head reads the adapted table, so factored == merged holds for it too.
        adapter = module.get_variable("lora", name)
        table = module.get_variable("params", name) if dense is None else dense[name]
        own = {**module.variables["params"], name: adapter.method.merge(table, adapter)}
        return module.clone(parent=None).apply({"params": own}, *args, method="attend", **kwargs)
    if context.method_name != "__call__" or not args:
        return next_fun(*args, **kwargs)
    if name is None or not module.has_variable("lora", name):
        return next_fun(*args, **kwargs)
    adapter = module.get_variable("lora", name)
    kernel = module.get_variable("params", name) if dense is None else dense[name]
    _check_shape(module, kernel, adapter)
    ctx = _CTX.get()
    y = next_fun(*args, **kwargs)
    x = args[0]
    if ctx.dropout_active(adapter):
        x = _dropout(module, x, adapter.dropout)
    bias = module.get_variable("params", "bias") if module.has_variable("params", "bias") else None
    return adapter.method.output(y, x, adapter, kernel, bias, module, ctx)


def _partition_saved(adapters):
    """(intercepted adapters, ``modules_to_save`` adapters) — the latter are added to the
    parameters before the forward pass."""
    flat = rules.flatten(adapters)
    low = {p: a for p, a in flat.items() if not isinstance(a.method, Saved)}
    saved = {p: a for p, a in flat.items() if isinstance(a.method, Saved)}
    return rules.unflatten(low), rules.unflatten(saved)


def _add_saved(params, saved):
    """``W + D`` for each saved parameter, in float32 when W is low-precision (a bf16 base keeps
    deltas far below its rounding step), so small trained deltas are never lost."""
    flat = rules.flatten(params)
    for path, a in rules.flatten(saved).items():
        if path not in flat:
            raise ValueError(f"adapter for {path!r} has no parameter at that path")
        w = flat[path]
        out = jnp.promote_types(w.dtype, jnp.float32)
        flat[path] = w.astype(out) + a.params["w"].astype(out)
    return rules.unflatten(flat)


def apply(
    model: nn.Module,
    params: Mapping[str, Any],
    adapters: Mapping[str, Any],
    *args,
    train: bool = False,
    task_ids: jax.Array | None = None,
    adapter_ids: jax.Array | None = None,
    rngs: Any = None,
    **kwargs,
):
    """Runs ``model.apply`` with the adapters injected, in factored form.

    Args:
      model: an unmodified Flax linen module.
      params: the base parameters.
      adapters: from ``init_adapters`` (after ``join`` if they were split).
      *args, **kwargs: passed to ``model.apply`` (e.g. tokens, ``deterministic=``, ``method=``).
      train: enables adapter dropout (needs a 'dropout' rng in ``rngs``).
      task_ids: int array (batch,) for methods that route per example (MTL-LoRA).
      adapter_ids: int array (batch,): each example's slot in a bank (``lj.stack_adapters``),
        -1 = base only.
      rngs: Flax rngs for ``model.apply``.
    Returns:
      Whatever ``model.apply`` returns.
    """
    low, saved = _partition_saved(adapters)
    params = _add_saved(_unbox(params), saved) if saved else _unbox(params)
    with _context(Ctx(train=train, task_ids=task_ids, adapter_ids=adapter_ids)), \
            nn.intercept_methods(_intercept):
        return model.apply({"params": params, "lora": low}, *args, rngs=rngs, **kwargs)


# ----------------------------------------------------------------------------- merge and friends


def _fold(params, adapters, fold: str, task: int | None):
    flat = rules.flatten(_unbox(params))
    for path, adapter in rules.flatten(adapters).items():
        if path not in flat:
            raise ValueError(f"adapter for {path!r} has no parameter at that path")
        kernel = flat[path]
        if quant.is_quantized(kernel):
            raise ValueError(
                f"{path!r} is quantised; folding an adapter into it re-quantises. Use "
                "lj.merge_quantized(model, params, adapters, batch) to merge and see the error, or "
                "lj.merge(lj.dequantize_params(params), adapters) for an exact dense merge.")
        n = adapter.layout.n_stack
        if tuple(kernel.shape[n:]) != adapter.layout.kernel_shape:
            raise ValueError(
                f"adapter for {path!r} expects a kernel of shape {adapter.layout.kernel_shape} "
                f"(per layer), got {kernel.shape}"
            )
        if task is not None:  # per-task methods (MTL-LoRA)
            flat[path] = getattr(adapter.method, f"{fold}_task")(kernel, adapter, task)
        else:
            flat[path] = getattr(adapter.method, fold)(kernel, adapter)
    return rules.unflatten(flat)


def merge(params: Mapping[str, Any], adapters: Mapping[str, Any], *,
          task: int | None = None, safe: bool = False) -> dict[str, Any]:
    """Folds every adapter into its kernel: ``W + s·A B`` for LoRA, ``m ⊙ V/‖V‖`` for DoRA.

    Methods that route per example (MTL-LoRA, per-task LoRA) merge one task at a time: pass
    ``task``. Computed in float32 and cast back to each kernel's dtype; a bf16 base keeps bf16 and
    pays bf16's rounding (relative error up to 2⁻⁹ per entry) once. ``safe=True`` (PEFT's
    ``safe_merge``) checks every merged kernel and raises ``ValueError`` naming the first one
    holding NaN/inf (e.g. from a diverged adapter).
    """
    merged = _fold(params, adapters, "merge", task)
    if safe:
        flat = rules.flatten(merged)
        for path in rules.flatten(adapters):
            if not bool(jnp.all(jnp.isfinite(flat[path]))):
                raise ValueError(f"merging the adapter into {path!r} gives NaN/inf values; the "
                                 "adapter (or the base kernel) is not finite: check the run that "
                                 "trained it (lj.merge(..., safe=False) merges anyway)")
    return merged


def unmerge(params: Mapping[str, Any], adapters: Mapping[str, Any], *,
            task: int | None = None) -> dict[str, Any]:
    """Inverse of ``merge`` (to float32 rounding)."""
    return _fold(params, adapters, "unmerge", task)


def transform_base(params: Mapping[str, Any], adapters: Mapping[str, Any]):
    """``(params, adapters)`` to train on: each method's base transform of its kernel and itself,
    e.g. PiSSA's residual ``W − s·A B`` (``Method.transform_base``). Identity for most methods."""
    flat = rules.flatten(_unbox(params))
    out = {}
    for path, adapter in rules.flatten(adapters).items():
        if path not in flat:
            raise ValueError(f"adapter for {path!r} has no parameter at that path")
        kernel = flat[path]
        if quant.is_quantized(kernel):
            dense = quant.dequantize(kernel, jnp.float32)
            new, out[path] = adapter.method.transform_base(dense, adapter)
            if new is not dense:
                raise ValueError(f"{path!r} is quantised, and method {adapter.method!r} "
                                 "transforms its base (e.g. PiSSA's residual), which would need "
                                 "re-quantising (QPiSSA/LoftQ, not supported); use a dense base")
            continue
        flat[path], out[path] = adapter.method.transform_base(kernel, adapter)
    return rules.unflatten(flat), rules.unflatten(out)


def regularizer(adapters: Mapping[str, Any]):
    """The sum of every adapter's ``Method.regularizer`` (0.0 when no method has one): the
    methods' loss terms, added to the training loss by the trainer (or by user code)."""
    terms = [a.method.regularizer(a) for a in jax.tree.leaves(adapters, is_leaf=is_adapter)
             if is_adapter(a)]
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else jnp.float32(0.0)


def with_params(adapters: Mapping[str, Any], tree: Mapping[str, Any]):
    """``adapters`` with their trainable arrays replaced by ``tree`` (a nested dict mirroring the
    adapters, holding each adapter's params dict, e.g. ``{'dense': {'kernel': {'a': A, 'b':
    B}}}``). Shapes and leaf names must match: this is how user arrays become adapters."""

    def one(adapter, new):
        if set(new) != set(adapter.params):
            raise ValueError(f"params {sorted(new)} do not match the adapter's "
                             f"{sorted(adapter.params)}")
        for k, v in new.items():
            if jnp.shape(v) != jnp.shape(adapter.params[k]):
                raise ValueError(f"params[{k!r}] has shape {jnp.shape(v)}, the adapter's has "
                                 f"{jnp.shape(adapter.params[k])}")
        return dataclasses.replace(adapter, params=dict(new))

    return jax.tree.map(one, adapters, tree, is_leaf=is_adapter)


def materialized(fn: Callable) -> Callable:
    """``fn(params, *a, **k)`` -> ``g(params, adapters, *a, **k) = fn(merge(params, adapters), ...)``.

    The materialised mode: works for any JAX function of a parameter tree, and is the reference
    the factored path is tested against.
    """

    def wrapped(params, adapters, *args, **kwargs):
        return fn(merge(params, adapters), *args, **kwargs)

    return wrapped


def split(adapters) -> tuple[Any, Any]:
    """(trainable, state): the same tree twice, with ``state`` resp. ``params`` emptied."""
    trainable = jax.tree.map(lambda a: dataclasses.replace(a, state={}), adapters,
                             is_leaf=is_adapter)
    state = jax.tree.map(lambda a: dataclasses.replace(a, params={}), adapters, is_leaf=is_adapter)
    return trainable, state


def join(trainable, state):
    """Inverse of ``split``."""
    return jax.tree.map(lambda t, s: dataclasses.replace(t, state=s.state), trainable, state,
                        is_leaf=is_adapter)


def count_params(tree) -> int:
    """Number of scalars in the array leaves of ``tree``; a quantised kernel counts its logical
    (dequantised) size, so QLoRA's trainable share matches LoRA's (bytes: ``quant.nbytes``)."""
    return sum(math.prod(x.shape) if quant.is_quantized(x) else math.prod(jnp.shape(x))
               for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized))


def summary(params: Mapping[str, Any], adapters: Mapping[str, Any]) -> str:
    """A table of the adapted paths and the trainable share (PEFT's definition: trainable
    adapter parameters over base + adapter parameters)."""
    rows = [("path", "method", "rank", "kernel", "trainable")]
    for path, a in sorted(rules.flatten(adapters).items()):
        rows.append((path, a.method.name, str(a.rank or "-"),
                     "x".join(map(str, a.layout.kernel_shape)), f"{count_params(a.params):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    trainable, _ = split(adapters)
    n_train, n_base = count_params(trainable), count_params(_unbox(params))
    lines.append(
        f"trainable params: {n_train:,} || all params: {n_base + n_train:,} || "
        f"trainable%: {100 * n_train / max(n_base + n_train, 1):.4f}"
    )
    return "\n".join(lines)

