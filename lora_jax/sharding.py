"""Meshes, logical axis rules, and the shardings of everything a training step touches.

Sharding comes in three layers (as in MaxText): a physical mesh with the axes ``('data', 'fsdp',
'fsdp2', 'tensor')`` ('fsdp2' is a second fsdp axis, size 1 unless asked for); logical axis rules, one dict per named preset (``RULES``), mapping the logical names
the models put on every parameter ('embed', 'heads', 'kv', 'kv_heads', 'mlp', 'vocab', 'layers')
to mesh axes; and the logical names themselves, read from ``nn.get_partition_spec`` of an abstract
``model.init``. Adapter shardings are derived from their kernel's: A keeps the kernel's input axes
and an unsharded rank axis, B an unsharded rank axis and the output axes, per-output state (DoRA's
magnitudes and base norms) the output axes, stacked ('layers') axes as in the kernel. Optimizer
state is sharded like the parameter it mirrors; the batch over ``DATA_AXES``. Multi-host start-up
lives in ``lora_jax.distributed``; the trainer wires all of this into its jitted step.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lora_jax import distributed
from lora_jax import rules as rules_lib
from lora_jax import transform
from lora_jax.methods import Adapter, is_adapter

MESH_AXES = ("data", "fsdp", "fsdp2", "tensor")
DATA_AXES = ("data", "fsdp", "fsdp2")  # the batch is split over all; fsdp, fsdp2 shard weights too
FSDP = ("fsdp", "fsdp2")  # a weight split over the product of the two fsdp axes
LOGICAL_NAMES = ("embed", "heads", "kv", "kv_heads", "mlp", "vocab", "layers")

# Mesh axis sizes per preset; -1 = whatever the device count leaves. MeshConfig fields override.
PRESET_SIZES = {
    "dp": {"data": -1, "fsdp": 1, "fsdp2": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "fsdp2": 1, "tensor": 1},
    "fsdp_tp": {"data": 1, "fsdp": -1, "fsdp2": 1, "tensor": 2},
}

# Logical name -> rule. A fixed rule is a mesh axis, a tuple of mesh axes (the dimension split
# over their product) or None (replicated); it is always applied, and a dimension it does not
# divide is an error. A list is ordered candidates (MaxText's logical_axis_rules), tried after the
# fixed rules of the same array in dimension order: the first candidate whose axes are unused in
# the array and divide the dimension wins, else the dimension is replicated. The candidates shard
# what a fixed rule leaves whole: B of q/k/v/gate/up ('heads', 'kv', 'mlp'), A of o/down, the
# vocabulary factors, and their optimizer moments. Weights split over both fsdp axes; a factor
# that neither divides (B of q at 256 devices: 32 heads x 128) takes one fsdp axis per dimension
# (with fsdp 32 x fsdp2 8: heads over 'fsdp', head-dim over 'fsdp2'). A candidate whose axes all
# have size 1 shards nothing and is skipped unless it is the first. The one place sharding policy
# lives.
_FSDP_FALLBACK = [FSDP, "fsdp", "fsdp2"]
RULES = {
    "dp": {name: None for name in LOGICAL_NAMES},
    "fsdp": {"embed": FSDP, "heads": _FSDP_FALLBACK, "kv": _FSDP_FALLBACK,
             "kv_heads": _FSDP_FALLBACK, "mlp": _FSDP_FALLBACK, "vocab": _FSDP_FALLBACK,
             "layers": None},
    "fsdp_tp": {"embed": FSDP, "heads": ["tensor", *_FSDP_FALLBACK], "kv": _FSDP_FALLBACK,
                "kv_heads": ["tensor", *_FSDP_FALLBACK], "mlp": ["tensor", *_FSDP_FALLBACK],
                "vocab": ["tensor", *_FSDP_FALLBACK], "layers": None},
}


# ----------------------------------------------------------------------------- mesh and rules


def _preset(name: str) -> str:
    if name not in PRESET_SIZES:
        raise ValueError(f"unknown mesh preset {name!r}; known: {sorted(PRESET_SIZES)}")
    return name


def mesh_shape(mc, n_devices: int) -> dict[str, int]:
    """Axis sizes for ``MeshConfig`` ``mc`` on ``n_devices`` devices (``-1`` inferred).

    A field of 0 keeps the preset's size. Example: preset 'fsdp_tp' on 8 devices ->
    ``{'data': 1, 'fsdp': 4, 'fsdp2': 1, 'tensor': 2}``.
    """
    sizes = dict(PRESET_SIZES[_preset(mc.preset)])
    for axis in MESH_AXES:
        value = getattr(mc, axis, 0)
        if value:
            sizes[axis] = value
    free = [a for a in MESH_AXES if sizes[a] == -1]
    bad = [a for a in MESH_AXES if sizes[a] < -1 or sizes[a] == 0]
    if len(free) > 1 or bad:
        raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1 (inferred) and the "
                         "others must be positive")
    known = math.prod(s for s in sizes.values() if s > 0)
    if n_devices % known:
        raise ValueError(f"mesh sizes {sizes} (product {known}) do not divide the {n_devices} "
                         f"devices; choose sizes whose product divides {n_devices}")
    if free:
        sizes[free[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh sizes {sizes} use {math.prod(sizes.values())} of the {n_devices} "
                         "devices; set one axis to -1 or make the product equal the device count")
    return sizes


def make_mesh(mc, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``MESH_AXES`` mesh for ``MeshConfig`` ``mc``.

    ``devices`` default to all devices of all processes, or the first ``mc.num_devices`` of them.
    """
    if devices is None:
        devices = jax.devices()
        if getattr(mc, "num_devices", 0):
            devices = devices[: mc.num_devices]
    sizes = mesh_shape(mc, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(mc, n_devices: int) -> jax.sharding.AbstractMesh:
    """A device-less mesh of the same shape, for lowering on hardware one does not have."""
    sizes = mesh_shape(mc, n_devices)
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                                     axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(mc) -> dict[str, Any]:
    """The preset's rules with ``mc.rules`` overrides applied.

    ``'mlp=tensor,vocab=none'`` sets fixed rules; ``'fsdp+tensor'`` splits over both axes' product;
    ``'mlp=tensor|fsdp'`` sets ordered candidates (see ``RULES``).
    """
    table = dict(RULES[_preset(mc.preset)])
    for item in filter(None, (s.strip() for s in getattr(mc, "rules", "").split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or name not in table:
            raise ValueError(f"mesh rule {item!r}: expected name=axis with name in {sorted(table)}")
        options = []
        for option in value.split("|"):
            axes = tuple(a for a in option.split("+") if a.lower() != "none")
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown:
                raise ValueError(f"mesh rule {item!r}: unknown mesh axis {unknown}; use "
                                 f"{MESH_AXES}")
            options.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        table[name] = options if "|" in value else options[0]
    return table


def _axes(rule) -> tuple[str, ...]:
    return (rule,) if isinstance(rule, str) else tuple(rule or ())


def to_mesh_spec(logical: Sequence[str | None], rules: Mapping[str, Any], where: str = "",
                 shape: Sequence[int] | None = None, mesh_sizes: Mapping[str, int] | None = None
                 ) -> P:
    """Logical names -> mesh ``PartitionSpec``; ``('embed', 'mlp')`` -> ``P('fsdp', None)``.

    Fixed rules first, then candidate lists in dimension order (``RULES``). With ``shape`` and
    ``mesh_sizes`` a candidate must divide its dimension; without them the first unused one wins.
    With ``mesh_sizes`` a split over several mesh axes leaves out those of size 1
    (``('fsdp', 'fsdp2')`` with 'fsdp2' of size 1 is written ``'fsdp'``: the same sharding).
    """
    def written(rule):
        axes = _axes(rule)
        if mesh_sizes is None or len(axes) < 2:
            return rule
        kept = tuple(a for a in axes if mesh_sizes[a] > 1) or axes[:1]
        return kept[0] if len(kept) == 1 else kept

    where = where or "parameter"
    out, used = [None] * len(logical), set()
    for name in logical:
        if name is not None and name not in rules:
            raise ValueError(f"{where}: logical axis {name!r} has no rule; "
                             f"known: {sorted(rules)}. Add it to the rules (MeshConfig.rules)")
    for i, name in enumerate(logical):
        rule = None if name is None else rules[name]
        if isinstance(rule, list):
            continue
        for a in _axes(rule):
            if a in used:
                raise ValueError(f"{where}: mesh axis {a!r} would shard two "
                                 f"dimensions of {tuple(logical)}; fix the rules")
            used.add(a)
        out[i] = written(rule)
    for i, name in enumerate(logical):
        rule = None if name is None else rules[name]
        if not isinstance(rule, list):
            continue
        for k, option in enumerate(rule):
            axes = _axes(option)
            if not axes or used & set(axes):
                continue
            size = None if mesh_sizes is None else math.prod(mesh_sizes[a] for a in axes)
            if size == 1 and k:
                continue
            if shape is not None and size is not None and shape[i] % size:
                continue
            out[i] = written(option)
            used |= set(axes)
            break
    return P(*out)


# ----------------------------------------------------------------------------- logical specs


UNNAMED = ("warn", "raise", "largest")


def param_logical_specs(model: nn.Module, *example, mesh=None, rules=None, unnamed: str = "warn",
                        **kwargs) -> dict[str, tuple]:
    """``{path: logical names}`` of every parameter, from an abstract ``model.init`` (no memory).

    With ``mesh`` and ``rules`` of a weight-sharding preset, parameters without logical names
    (a plain ``nn.Dense``) are handled by ``unnamed``: ``'warn'`` lists them with their bytes,
    ``'raise'`` fails, ``'largest'`` shards them over the 'embed' rule's axes along their largest
    dimension that divides (see ``name_unnamed``).
    """
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *example, **kwargs))
    specs = nn.get_partition_spec(abstract)["params"]
    specs = {path: tuple(spec) for path, spec in rules_lib.flatten(specs).items()}
    if mesh is None:
        return specs
    shapes = rules_lib.flatten(nn.meta.unbox(abstract)["params"])
    return name_unnamed(specs, shapes, mesh, rules, unnamed)


def name_unnamed(specs: Mapping[str, tuple], shapes: Mapping[str, Any], mesh, rules,
                 policy: str = "warn") -> dict[str, tuple]:
    """``specs`` with every parameter that has no logical names dealt with by ``policy``.

    Only on a mesh whose 'embed' rule shards (fsdp, fsdp_tp): there a nameless parameter would be
    silently replicated. ``'largest'`` names the largest dimension that the 'embed' rule's axes
    divide 'embed' (so its adapters and optimizer state follow), e.g. a ``(512, 2048)`` Dense
    kernel on 8 fsdp devices -> ``(None, 'embed')``; parameters with no such dimension stay
    replicated and are warned about.
    """
    if policy not in UNNAMED:
        raise ValueError(f"unnamed={policy!r}; choose one of {UNNAMED}")
    embed = rules.get("embed") if rules else None
    options = embed if isinstance(embed, list) else [embed]
    sizes = [math.prod(mesh.shape[a] for a in _axes(o)) for o in options if _axes(o)]
    if not sizes or max(sizes) == 1:
        return dict(specs)
    out, left = dict(specs), {}
    for path, names in specs.items():
        if names:
            continue
        shape = np.shape(shapes[path])
        if policy == "largest":
            fits = [i for i in np.argsort(shape)[::-1] if shape[i] % min(sizes) == 0]
            if fits:
                out[path] = tuple("embed" if i == fits[0] else None for i in range(len(shape)))
                continue
        left[path] = math.prod(shape) * np.dtype(shapes[path].dtype).itemsize
    if left:
        listed = ", ".join(f"{p} ({n:,} B)" for p, n in sorted(left.items()))
        msg = (f"{len(left)} parameters have no logical axis names and are replicated on every "
               f"device ({sum(left.values()):,} B in all): {listed}. Name their axes "
               "(nn.with_logical_partitioning) or pass unnamed='largest'")
        if policy == "raise":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return out


# Per leaf of an adapter: tokens 'stack', 'in', 'out', 'kernel' (the kernel's own axes), None
# (one unsharded axis, e.g. the rank) and 'rest' (every remaining axis unsharded).
def _kernel_axes(adapter: Adapter, kernel_names: tuple, path: str):
    """(stack, in, out, own) logical names of the adapter's kernel."""
    layout, n = adapter.layout, adapter.layout.n_stack
    if len(kernel_names) != n + len(layout.kernel_shape):
        raise ValueError(f"adapter {path!r}: kernel has logical axes {kernel_names} but the "
                         f"adapter expects {n} stacked + {len(layout.kernel_shape)} kernel axes")
    stack, own = kernel_names[:n], kernel_names[n:]
    if layout.kind == "full":
        return stack, (), own, own
    src, dst = (s.replace("...", "") for s in layout.canon.split("->"))
    by_letter = dict(zip(src, own))
    n_in = len(layout.in_shape)
    return (stack, tuple(by_letter[c] for c in dst[:n_in]),
            tuple(by_letter[c] for c in dst[n_in:]), own)


def adapter_logical_specs(adapter: Adapter, kernel_names: tuple, path: str = "") -> Adapter:
    """The adapter with each array leaf replaced by its tuple of logical axis names."""
    stack, ins, outs, own = _kernel_axes(adapter, kernel_names, path)
    tokens = {"stack": stack, "in": ins, "out": outs, "kernel": own, None: (None,)}
    table = adapter.method.leaf_axes(adapter)  # the method owns its leaves' axes

    def leaf(group, name, x):
        pattern = table.get(name)
        if pattern is None:  # unknown leaf: the kernel's axes if it has its shape, else the stack
            full = len(stack) + len(own)
            pattern = ("stack", "kernel") if np.ndim(x) == full else ("stack", "rest")
        names = []
        for t in pattern:
            names += [None] * (np.ndim(x) - len(names)) if t == "rest" else list(tokens[t])
        if len(names) != np.ndim(x):
            raise ValueError(f"adapter {path!r}: {group}[{name!r}] has shape {np.shape(x)}, "
                             f"which does not fit the axes {tuple(names)} derived from its kernel")
        return tuple(names)

    return dataclasses.replace(
        adapter,
        params={k: leaf("params", k, v) for k, v in adapter.params.items()},
        state={k: leaf("state", k, v) for k, v in adapter.state.items()})


def _quantized_specs(q, names: tuple):
    """A quantised kernel (a pytree whose fields keep the kernel's axes): a field's axis takes the
    kernel's name where it has the kernel's size (or half of it: the packed NF4 codes); block
    statistics, whose blocked axis is 64x shorter, are replicated along that axis (they hold
    1/64 of the kernel's entries, in int8)."""
    shape = tuple(q.shape)

    def field(x):
        if np.ndim(x) != len(names):
            return (None,) * np.ndim(x)
        return tuple(n if d in (k, k // 2) else None for n, d, k in zip(names, np.shape(x), shape))

    return jax.tree.map(field, q)


def logical_specs(tree: Mapping[str, Any], param_specs: Mapping[str, tuple]) -> dict[str, Any]:
    """Logical names for a tree keyed like the params: parameters, adapters, quantised kernels.

    Returns the tree with every array leaf replaced by a tuple of logical names (adapters keep
    their ``Adapter`` node, with tuples in ``params``/``state``).
    """
    out = {}
    for path, x in rules_lib.flatten(tree).items():
        if path not in param_specs:
            raise ValueError(f"{path!r} is not a parameter of the model, so it has no logical "
                             "axes; adapters and frozen trees must be keyed by parameter paths")
        names = param_specs[path]
        if is_adapter(x):
            if not names:  # a parameter without logical names is replicated
                names = (None,) * (x.layout.n_stack + len(x.layout.kernel_shape))
            out[path] = adapter_logical_specs(x, names, path)
        elif isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            if len(names) != np.ndim(x):
                if names:
                    raise ValueError(f"{path!r} has shape {np.shape(x)} but logical axes {names}")
                names = (None,) * np.ndim(x)
            out[path] = names
        else:
            out[path] = _quantized_specs(x, names)
    return rules_lib.unflatten(out)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def shardings(logical_tree, mesh, rules: Mapping[str, Any], like=None):
    """Logical-name tree -> ``NamedSharding`` tree. With ``like`` (arrays or ShapeDtypeStructs
    of the same structure) every sharded dimension is checked to divide evenly."""
    def one(path, names, x=None):
        where = jax.tree_util.keystr(path)
        spec = to_mesh_spec(names, rules, where, None if x is None else np.shape(x),
                            dict(mesh.shape))
        if x is not None:
            for dim, axis in zip(np.shape(x), spec):
                size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str)
                                                         else axis or ()))
                if dim % size:
                    raise ValueError(f"{where}: dimension of size {dim} (shape {np.shape(x)}, "
                                     f"logical axes {names}) does not divide over mesh axes "
                                     f"{axis} of size {size}; change the rules or the mesh")
        return NamedSharding(mesh, spec)

    if like is None:
        return jax.tree_util.tree_map_with_path(one, logical_tree, is_leaf=_is_names)
    return jax.tree_util.tree_map_with_path(one, logical_tree, like, is_leaf=_is_names)


def base_shardings(param_specs: Mapping[str, tuple], mesh, rules, like=None):
    """``NamedSharding`` of every base parameter (nested dict), from ``param_logical_specs``."""
    return shardings(rules_lib.unflatten(dict(param_specs)), mesh, rules, like)


def opt_state_shardings(tx, params, param_shardings, mesh):
    """Shardings of ``tx.init(params)``: every leaf that mirrors a parameter is sharded like it.

    A leaf mirrors a parameter when the parameter's key path is a suffix of the leaf's path (the
    longest such) and the shapes agree: optax states hold copies of the parameter tree (``mu``,
    ``nu``, ``trace``, ...) under their own fields, inside ``multi_transform``/``chain`` wrappers.
    Everything else (step counts, factored statistics) is replicated.
    """
    abstract = jax.eval_shape(tx.init, params)
    flat_p, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_s = jax.tree.leaves(param_shardings)
    by_path = {tuple(path): (np.shape(x), s) for (path, x), s in zip(flat_p, flat_s)}
    replicated = NamedSharding(mesh, P())

    def one(path, x):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == np.shape(x):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract)


def _is_replicated(s) -> bool:
    return all(_axes(a) == () for a in s.spec)


def replicated_leaves(shardings_tree, shapes_tree, threshold_bytes: int = 2**20
                      ) -> dict[str, int]:
    """``{path: bytes}`` of every fully replicated leaf larger than ``threshold_bytes``.

    ``shapes_tree`` mirrors ``shardings_tree`` (arrays or ``ShapeDtypeStruct``s). Nothing is
    reported on a mesh whose weight axes ('fsdp', 'fsdp2', 'tensor') have size 1 (``dp``: replication is
    the point).
    """
    flat_s, _ = jax.tree_util.tree_flatten_with_path(shardings_tree)
    if not flat_s or math.prod(flat_s[0][1].mesh.shape.get(a, 1) for a in (*FSDP, "tensor")) == 1:
        return {}
    out = {}
    for (path, s), x in zip(flat_s, jax.tree.leaves(shapes_tree)):
        nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        if _is_replicated(s) and nbytes > threshold_bytes:
            out[jax.tree_util.keystr(path)] = nbytes
    return out


def check_sharded(shardings_tree, shapes_tree, threshold_bytes: int = 2**20) -> None:
    """Raises naming every fully replicated leaf over ``threshold_bytes`` (as MaxText's
    ``assert_params_sufficiently_sharded``); call it at setup on params, adapters and optimizer
    state. The fix is a rule (``MeshConfig.rules``, candidates ``'mlp=tensor|fsdp'``) or a mesh
    whose axes divide the leaf's dimensions."""
    bad = replicated_leaves(shardings_tree, shapes_tree, threshold_bytes)
    if bad:
        listed = ", ".join(f"{p} ({n / 2**20:.1f} MiB)" for p, n in sorted(bad.items()))
        raise ValueError(f"{len(bad)} leaves are fully replicated on every device although the "
                         f"mesh shards weights: {listed}. Add a rule or candidate for their "
                         "logical axes (MeshConfig.rules) or raise the threshold")


def batch_sharding(mesh) -> NamedSharding:
    """The batch's leading axis over ``DATA_AXES``; other axes unsharded."""
    return NamedSharding(mesh, P(DATA_AXES))


def check_batch(batch_size: int, mesh, what: str = "train.batch_size") -> None:
    n = math.prod(mesh.shape[a] for a in DATA_AXES)
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} does not divide over the data axes {DATA_AXES} "
                         f"(size {n}); use a multiple of {n}")


# ----------------------------------------------------------------------------- placement


def put(tree, shardings_tree, *, may_alias: bool = False):
    """Places a tree on the mesh: host or one-device arrays that every process holds in full
    (same values), or global arrays already on the mesh (resharded if their sharding differs).

    By default the result never aliases the caller's arrays: a donating step may then delete what
    ``put`` returns and the caller's tree stays usable. ``may_alias=True`` skips the copy of an
    array already placed as asked, for trees no step donates (a frozen base, which a copy would
    double).
    """
    if jax.process_count() == 1:
        placed = jax.device_put(tree, shardings_tree, may_alias=may_alias)
        if may_alias:
            return placed
        # device_put(may_alias=False) still reuses a one-device x's buffer as the replica on that
        # device (jax 0.10): copy just those leaves, after placement (never a whole host array
        # onto one device first).
        return jax.tree.map(lambda x, y: jnp.array(y, copy=True) if _shares_buffers(x, y) else y,
                            tree, placed)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard
            if may_alias and x.sharding.is_equivalent_to(s, x.ndim):
                return x
            return jax.jit(lambda v: jnp.array(v, copy=True), out_shardings=s)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings_tree)


def _shares_buffers(x, y) -> bool:
    if not isinstance(x, jax.Array):
        return False
    pointers = lambda a: {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}
    return bool(pointers(x) & pointers(y))


def base_shapes(model: nn.Module, example, mesh, rules, *, unnamed="warn"):
    """The model's params as ``jax.ShapeDtypeStruct``s (unboxed, nested dict), each carrying its
    ``NamedSharding`` by ``rules``: from an abstract init (``jax.eval_shape``), nothing allocated.
    What a sharded init, a sharded checkpoint read (``io.load_params(like=...)``,
    ``hf_sharded.load_hf_sharded``) and placement start from."""
    specs = param_logical_specs(model, example, mesh=mesh, rules=rules, unnamed=unnamed)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), example)["params"]))
    out = base_shardings(specs, mesh, rules, shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        out)


def init_sharded(model: nn.Module, example, mesh, rules, seed: int = 0, *, unnamed="warn"):
    """The model's params (unboxed, nested dict) created directly in their shards.

    Shardings come from ``jax.eval_shape`` first (``base_shapes``); then ``jax.jit(init,
    out_shardings=...)`` writes each device's shard on that device, so no device (or host) ever
    holds a whole weight. Same values as ``model.init(jax.random.key(seed), example)['params']``
    on one device.
    """
    out = jax.tree.map(lambda x: x.sharding,
                       base_shapes(model, example, mesh, rules, unnamed=unnamed))
    init = lambda k: nn.meta.unbox(model.init(k, example)["params"])
    return jax.jit(init, out_shardings=out)(jax.random.key(seed))


def init_adapters_sharded(params, spec, key, param_specs, mesh, rules, *, layouts=None):
    """``lj.init_adapters(params, spec, key, layouts=layouts)`` with every adapter leaf created in
    its shard (``jax.jit(..., out_shardings=...)``); ``params`` may be sharded arrays. Returns
    ``(adapters, shardings)``."""
    init = lambda p, k: transform.init_adapters(p, spec, k, layouts=layouts)
    shapes = jax.eval_shape(init, params, key)
    out = shardings(logical_specs(shapes, param_specs), mesh, rules, shapes)
    return jax.jit(init, out_shardings=out)(params, key), out


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """A global batch from each process's slice of rows (``ArrayLoader.batch``)."""
    s = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v))
            for k, v in local_batch.items()}


def replicate_batch(global_batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """A global batch that every process holds in full (eval), split over the data axes."""
    s = batch_sharding(mesh)
    return put({k: np.asarray(v) for k, v in global_batch.items()}, {k: s for k in global_batch})


def batch_sharded(forward, mesh):
    """``forward`` with the batch axis of every layer output constrained to ``DATA_AXES``.

    Without it the partitioner may follow the weights instead: under fsdp an embedding lookup
    from a table sharded on 'embed' comes out sharded on 'embed' with the batch replicated, and
    every device then computes the whole batch (the 7B step's temporaries grow ~256x). The
    constraint is applied by intercepting the Flax layers (Embed, Dense, DenseGeneral, Einsum, so
    any model works) to outputs whose leading axis is the batch; other axes stay unconstrained, so
    tensor-parallel layouts are left to the rules. ``forward(trainable, frozen, inputs, ...)``,
    ``inputs`` an array or a tuple of arrays (batch first).
    """
    spec = lambda ndim: NamedSharding(mesh, P(DATA_AXES, *[P.UNCONSTRAINED] * (ndim - 1)))
    layers = (nn.Embed, nn.Dense, nn.DenseGeneral, nn.Einsum)

    def wrapped(trainable, frozen, inputs, *args, **kwargs):
        batch = jax.tree.leaves(inputs)[0].shape[0]

        def constrain(next_fun, call_args, call_kwargs, context):
            out = next_fun(*call_args, **call_kwargs)
            if isinstance(context.module, layers) and getattr(out, "ndim", 0) >= 2 \
                    and out.shape[0] == batch:
                out = jax.lax.with_sharding_constraint(out, spec(out.ndim))
            return out

        with nn.intercept_methods(constrain):
            return forward(trainable, frozen, inputs, *args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- export


def gather_for_export(trainable, frozen):
    """``(trainable, frozen)`` ready for an adapter export on process 0: the trainable tree and
    ``frozen['state']`` gathered (fully replicated, readable by host code on any process), the
    frozen base ``frozen['params']`` passed through in its shards, never gathered. Every process
    must call it (it runs collectives)."""
    base = {"params": frozen["params"]} if "params" in frozen else {}
    rest = {k: v for k, v in frozen.items() if k != "params"}
    trainable, rest = distributed.gather((trainable, rest))
    return trainable, {**rest, **base}


def merge_sharded(params, adapters, base_sharding_tree=None, **kwargs):
    """``lj.merge(params, adapters)`` under ``jax.jit`` with the merged kernels sharded like the
    base (``base_sharding_tree``, e.g. ``TrainShardings.frozen['params']``; default: the params'
    own shardings): no device ever holds a whole merged kernel. ``kwargs`` go to ``lj.merge``
    (``task=``)."""
    if base_sharding_tree is None:
        base_sharding_tree = jax.tree.map(lambda x: x.sharding, params)
    merge = lambda p, a: transform.merge(p, a, **kwargs)
    return jax.jit(merge, out_shardings=base_sharding_tree)(params, adapters)


@dataclasses.dataclass(frozen=True)
class TrainShardings:
    """Shardings of the train step's arguments: trees mirror the values they describe."""

    mesh: Mesh
    trainable: Any
    opt_state: Any
    frozen: Any
    batch: NamedSharding
    replicated: NamedSharding


def train_shardings(mesh, rules, param_specs, trainable, frozen, tx) -> TrainShardings:
    """Shardings for a step over ``trainable`` (params or adapters) and ``frozen``
    (``{}`` or ``{'params': ..., 'state': ...}``), all keyed by parameter paths."""
    t = shardings(logical_specs(trainable, param_specs), mesh, rules, trainable)
    f = {k: shardings(logical_specs(v, param_specs), mesh, rules, v) for k, v in frozen.items()}
    o = opt_state_shardings(tx, trainable, t, mesh)
    return TrainShardings(mesh, t, o, f, batch_sharding(mesh), NamedSharding(mesh, P()))


def describe(sharding_tree) -> dict[str, str]:
    """``{'/'-joined path: 'PartitionSpec(...)'}``, e.g. for golden files and logs."""
    flat, _ = jax.tree_util.tree_flatten_with_path(sharding_tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): str(s.spec)
            for path, s in flat}
