"""Adapter methods: the unit of extension, an open registry, and the ``Adapter`` pytree node.

A method is a frozen dataclass deriving from ``Method``: its fields are its typed hyperparameters
(checked when it is built; an unknown keyword is a ``TypeError``), and it owns everything about
itself (see ``Method``): the math of one adapted kernel, the logical sharding axes of its leaves,
its optimizer groups, an optional regulariser, an optional training callback and an optional
transform of the frozen base. ``lj.methods.lora()``, ``lj.methods.dora(init_weights='pissa')``,
``lj.methods.mtl(num_tasks=4, temperature=0.1)`` build one; ``register(name, factory)`` adds a
method from user code, and ``make(name, **args)`` builds one by its registered name (what configs
use). Nothing else in lora_jax names a method: the transform, the optimizer, the sharding rules
and the trainer ask the method object carried by each ``Adapter``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from typing import Any, Callable, ClassVar, Mapping, Protocol

import jax
import optax

from lora_jax.layers import Layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """One kernel's adapter.

    Attributes:
      params: trainable arrays, e.g. ``{'a': (*stack, *in, r), 'b': (*stack, r, *out)}``.
      state: non-trainable arrays (masks, base norms, frozen factors); split off by ``lj.split``.
      method: the ``Method`` object that owns the math (static, hashable).
      scale: the adapter scale s (alpha/r, or alpha/sqrt(r) for rsLoRA).
      layout: static kernel layout (axes, stacked axes, einsum strings).
      dropout: dropout rate on the adapter branch's input.
      tied_head: for an embedding table that an LM head shares (``nn.Embed.attend``): whether the
        head reads the adapted table (PEFT's ``ensure_weight_tying=True``) or the base one.
    """

    params: dict[str, Any]
    state: dict[str, Any]
    method: "Method" = dataclasses.field(metadata=dict(static=True))
    scale: float = dataclasses.field(metadata=dict(static=True))
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    tied_head: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        for group in (self.params, self.state):
            if "a" in group:
                return group["a"].shape[-1]
        return 0


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Per-call context: train mode and per-example routing (task ids, shape (batch,))."""

    train: bool = False
    task_ids: Any = None
    adapter_ids: Any = None  # (batch,) bank slots for methods/bank.py, -1 = base only

    def dropout_active(self, adapter: Adapter) -> bool:
        """Whether the adapter branch's input ``x`` was dropped out (so differs from the base's)."""
        return self.train and adapter.dropout > 0 and adapter.layout.kind != "embed"


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


@dataclasses.dataclass(frozen=True)
class Run:
    """What a method's training callback may use: the run it is part of (built by the trainer)."""

    model: Any
    train_arrays: Mapping[str, Any]
    tasks: tuple[str, ...]
    steps: int
    seed: int
    workdir: Any
    evaluate: Callable | None = None  # (trainable, frozen) -> {'loss', 'accuracy': {...}}
    log: Callable[[str], None] = print
    inputs: tuple[str, ...] = ("inputs",)  # the batch keys the model takes, in order (data kind)


class Callback(Protocol):
    """A method's hook into the training loop (between steps; it never changes array shapes, so
    the step never recompiles). ``frozen`` is ``{'params': base, 'state': adapter state}``."""

    def restore(self, step: int, frozen): ...  # after a resume at ``step``: the frozen tree then

    def __call__(self, step: int, trainable, frozen): ...  # before step ``step``: new frozen tree

    def finish(self, trainable, frozen, workdir) -> dict: ...  # after training: summary entries


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Checks a hyperparameter against a plain ``int``/``float``/``bool``/``str`` annotation."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {float: number, int: number and float(value).is_integer() and not isinstance(value, float),
          bool: isinstance(value, bool), str: isinstance(value, str)}.get(hint, True)
    if not ok:
        raise TypeError(f"{name} must be {hint.__name__}, got {value!r}")


class Method:
    """The method protocol. Subclass as ``@dataclasses.dataclass(frozen=True)``; fields are
    hyperparameters. Required: ``name``, ``init``, ``output``, ``merge``, ``unmerge``.

    Shapes are Flax's kernel layout, for one (possibly stacked) kernel: ``layout.in_shape``,
    ``layout.out_shape`` and ``layout.n_stack`` leading stacked-layer axes (``nn.scan``); every
    array leaf an adapter holds carries the stacked axes first, so a scan slices it per layer.
    """

    name: ClassVar[str] = ""
    example_args: ClassVar[dict] = {}  # arguments the conformance suite builds it with
    # Its adapters of several runs stack into one routed bank (lj.stack_adapters), so a batched
    # sweep (train/batched.py) can train them in one step.
    stackable: ClassVar[bool] = False

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f"{self.name}.{f.name}", getattr(self, f.name), hints.get(f.name))

    # --- the math (required) -----------------------------------------------------------------
    def init(self, key, kernel, layout: Layout, rank: int, scale: float,
             dropout: float) -> Adapter:
        """The adapter for ``kernel`` (dense, float32 leaves; its identity init where it has one,
        so that the adapted model starts as the base)."""
        raise NotImplementedError

    def output(self, y, x, adapter: Adapter, kernel, bias, module, ctx: Ctx):
        """The adapted layer output for ONE layer (stacked axes already sliced off): ``y`` is the
        base output (bias included), ``x`` the layer input after the adapter's dropout."""
        raise NotImplementedError

    def merge(self, kernel, adapter: Adapter):
        """The kernel with the adapter folded in (float32 math, the kernel's dtype out)."""
        raise NotImplementedError

    def unmerge(self, kernel, adapter: Adapter):
        """Inverse of ``merge``."""
        raise NotImplementedError

    # --- optional ----------------------------------------------------------------------------
    def merge_task(self, kernel, adapter: Adapter, task: int):
        """``merge`` for one task (methods that route per example override it)."""
        raise ValueError(f"method {self.name!r} does not route per task; call merge without task")

    def unmerge_task(self, kernel, adapter: Adapter, task: int):
        raise ValueError(f"method {self.name!r} does not route per task; call unmerge without task")

    def transform_base(self, kernel, adapter: Adapter):
        """``(kernel, adapter)`` to train on, given the pretrained kernel and the fresh adapter:
        e.g. PiSSA's residual ``W − s·A B``. Identity by default."""
        return kernel, adapter

    def leaf_axes(self, adapter: Adapter) -> dict[str, tuple]:
        """Logical axes of each leaf, as patterns over the kernel's axes: tokens ``'stack'``,
        ``'in'``, ``'out'``, ``'kernel'`` (all kernel axes), ``'rest'`` (unsharded to the end) and
        ``None`` (one unsharded axis). Leaves not named get the kernel's axes when they have its
        rank, else ``('stack', 'rest')``."""
        return {}

    def param_groups(self, adapter: Adapter) -> dict[str, str]:
        """Optimizer group of each trainable leaf not in the default group (``'frozen'``: no
        update and no optimizer state; any other name: ``group_transform(name)`` after the
        optimizer)."""
        return {}

    def group_transform(self, group: str) -> optax.GradientTransformation:
        raise ValueError(f"method {self.name!r} has no optimizer group {group!r}")

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """The whole adapter optimizer, wrapped (e.g. AdaLoRA's importance and budget masking).
        Sees every adapter of the tree; must leave other methods' leaves unchanged."""
        return tx

    def regularizer(self, adapter: Adapter):
        """A scalar added to the training loss for this adapter, or None."""
        return None

    def callback(self, run: Run) -> Callback | None:
        """A training callback for ``run`` (schedules that change masks or ranks), or None."""
        return None


# ----------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str, factory: Callable[..., Method], *, overwrite: bool = False) -> None:
    """Makes ``make(name, **args)`` (and configs' ``method=name``) build ``factory(**args)``.

    ``factory`` is usually the method's dataclass. Registering a taken name raises unless
    ``overwrite`` (re-running the module that registered it, e.g. a config file loaded twice,
    is fine); 'full' is reserved for full fine-tuning (the trainer's baseline, not a method).
    """
    if name == "full":
        raise ValueError("'full' is reserved for full fine-tuning; pick another method name")
    same = lambda f: (getattr(f, "__qualname__", None), getattr(f, "name", None))
    if name in _REGISTRY and not overwrite and same(_REGISTRY[name]) != same(factory):
        raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace")
    _REGISTRY[name] = factory


def known() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., Method]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown adapter method {name!r}{hint} (known: {known()}); "
                         "a new one is added with lj.methods.register(name, factory)")
    return _REGISTRY[name]


def arguments(name: str) -> dict[str, Any]:
    """The keyword arguments of method ``name`` with their defaults (what a config may set)."""
    out = {}
    for p in inspect.signature(_factory(name)).parameters.values():
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            out[p.name] = None if p.default is p.empty else p.default
    return out


def make(method: str | Method, **args) -> Method:
    """The method object: ``method`` itself if it is one, else the registered factory called with
    ``args``. Unknown argument names raise, naming the known ones."""
    if isinstance(method, Method):
        if args:
            raise TypeError(f"got a built method {method!r} and arguments {sorted(args)}")
        return method
    known_args = arguments(method)
    unknown = [k for k in args if k not in known_args]
    if unknown:
        hints = {k: difflib.get_close_matches(k, known_args, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                         for k, h in hints.items())
        raise TypeError(f"method {method!r} has no argument {said}; its arguments: "
                        f"{sorted(known_args)}")
    return _factory(method)(**args)


def from_config(name: str, args: Mapping[str, Any]) -> Method:
    """The method of a config: ``make(name, **args)`` with the entries of ``args`` that method
    ``name`` takes (a config that sweeps several methods holds the union of their arguments)."""
    known_args = arguments(name)
    return make(name, **{k: v for k, v in args.items() if k in known_args})


def methods_of(adapters) -> list[Method]:
    """The distinct methods of an adapter tree, in first-seen order."""
    seen: dict[Method, None] = {}
    for a in jax.tree.leaves(adapters, is_leaf=is_adapter):
        if is_adapter(a):
            seen.setdefault(a.method)
    return list(seen)


from lora_jax.methods.bank import Bank  # noqa: E402  (the registry is filled at import)
from lora_jax.methods.dora import DoRA  # noqa: E402
from lora_jax.methods.lora import LoRA  # noqa: E402
from lora_jax.methods.mtl import MTL  # noqa: E402
from lora_jax.methods.multi import MultiLoRA, PerTask  # noqa: E402
from lora_jax.methods.saved import Saved  # noqa: E402
from lora_jax.methods.sparse import LoSA  # noqa: E402

# Factories under their registered names: lj.methods.lora(...), lj.methods.mtl(num_tasks=4).
lora, dora, mtl, per_task, multilora, losa = LoRA, DoRA, MTL, PerTask, MultiLoRA, LoSA
for _m in (LoRA, DoRA, MTL, PerTask, MultiLoRA, LoSA, Saved, Bank):
    register(_m.name, _m)
del _m
from lora_jax.methods.vera import VeRA as vera; register("vera", vera)  # noqa
from lora_jax.methods.lora_fa import LoRAFA as lora_fa; register("lora_fa", lora_fa)  # noqa
from lora_jax.methods.adalora import AdaLoRA as adalora; register("adalora", adalora)  # noqa
