"""Kernel layouts: how an adapted layer contracts its input with its kernel.

A ``Layout`` is static, hashable metadata carried by every adapter. It says which kernel axes are
input axes (A follows them) and which are output axes (B follows them), how many leading axes are
stacked layers (``nn.scan``), and the einsum strings that compute ``x·A``, ``h·B`` and ``A·B`` for
that kernel, so that multi-axis ``DenseGeneral``/``Einsum`` kernels need no reshaping. Layouts come
from the Flax module that owns a kernel (``layout_of_module``, used by an abstract trace of one
forward pass) or, for plain 2-D kernels and embeddings, from the parameter tree alone
(``layout_of_param``). The adapter math itself lives in ``methods/``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any

import jax
import jax.numpy as jnp

R = "R"  # the rank letter in every einsum string below


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one adapted kernel.

    Attributes:
      kind: 'dense' (Dense, DenseGeneral, Einsum and NNX equivalents), 'embed' or 'conv'.
      in_shape: sizes of the kernel's input axes (for conv: window + in-channels).
      out_shape: sizes of the kernel's output axes.
      kernel_shape: the per-layer kernel shape (without stacked axes).
      n_stack: number of leading stacked-layer axes on the stored kernel (``nn.scan``).
      xa: einsum ``x, A -> h`` (h has the rank axis last); unused for embed and conv.
      hb: einsum ``h, B -> y`` with y in the layer's output axis order.
      ab: einsum ``A, B -> kernel`` with a leading ``...`` for stacked axes.
      canon: einsum ``kernel -> kernel`` permuting to (in axes..., out axes...), ``...`` leading.
    """

    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    n_stack: int = 0
    xa: str = ""
    hb: str = "...R,Ro->...o"
    ab: str = "...iR,...Ro->...io"
    canon: str = "...io->...io"

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    def stacked(self, n_stack: int) -> "Layout":
        return dataclasses.replace(self, n_stack=n_stack)


def _letters(n: int, avoid: str = "") -> str:
    pool = [c for c in string.ascii_lowercase if c not in avoid]
    if n > len(pool):
        raise ValueError(f"too many kernel axes ({n})")
    return "".join(pool[:n])


def dense_layout(
    kernel_shape: tuple[int, ...], n_in: int, x_axes: tuple[int, ...] | None = None
) -> Layout:
    """Layout of a DenseGeneral-style kernel ``(*in, *out)``.

    ``x_axes`` are the (negative) input axes contracted, in kernel order; default: the trailing
    ``n_in`` axes of x.
    """
    kernel_shape = tuple(kernel_shape)
    if not 0 < n_in < len(kernel_shape):
        raise ValueError(f"kernel of shape {kernel_shape} cannot have {n_in} input axes")
    ins = _letters(n_in)
    outs = _letters(len(kernel_shape) - n_in, avoid=ins)
    x_axes = x_axes if x_axes is not None else tuple(range(-n_in, 0))
    # x spec: '...' then explicit letters from the first contracted axis to the end.
    first = min(x_axes)
    tail = [""] * (-first)
    for letter, ax in zip(ins, x_axes):
        tail[ax] = letter
    free = iter(_letters(len(tail), avoid=ins + outs))
    tail = [c or next(free) for c in tail]
    x_spec = "..." + "".join(tail)
    rem = "..." + "".join(c for c in tail if c not in ins)
    return Layout(
        kind="dense",
        in_shape=kernel_shape[:n_in],
        out_shape=kernel_shape[n_in:],
        kernel_shape=kernel_shape,
        xa=f"{x_spec},{ins}{R}->{rem}{R}",
        hb=f"{rem}{R},{R}{outs}->{rem}{outs}",
        ab=f"...{ins}{R},...{R}{outs}->...{ins}{outs}",
        canon=f"...{ins}{outs}->...{ins}{outs}",
    )


def einsum_layout(equation: str, kernel_shape: tuple[int, ...]) -> Layout:
    """Layout of an ``nn.Einsum`` kernel (the second operand of ``equation``)."""
    eq = equation.replace(" ", "")
    lhs, ys = eq.split("->")
    xs, ks = lhs.split(",")
    if R in eq:
        raise ValueError(f"einsum {equation!r} uses the letter {R!r}, reserved for the rank axis")
    ins = "".join(c for c in ks if c in xs and c not in ys)
    outs = "".join(c for c in ks if c in ys and c not in xs)
    if len(ins) + len(outs) != len(ks):
        raise ValueError(
            f"einsum {equation!r}: kernel axes that are batch axes (in input and output) or summed "
            "out are not supported by adapters"
        )
    rem = "".join(c for c in xs.replace("...", ".") if c not in ins).replace(".", "...")
    sizes = dict(zip(ks, kernel_shape))
    if sorted(rem.replace("...", "") + outs) != sorted(ys.replace("...", "")):
        raise ValueError(f"einsum {equation!r}: output axes are not input axes plus kernel axes")
    return Layout(
        kind="dense",
        in_shape=tuple(sizes[c] for c in ins),
        out_shape=tuple(sizes[c] for c in outs),
        kernel_shape=tuple(kernel_shape),
        xa=f"{xs},{ins}{R}->{rem}{R}",
        hb=f"{rem}{R},{R}{outs}->{ys}",
        ab=f"...{ins}{R},...{R}{outs}->...{ks}",
        canon=f"...{ks}->...{ins}{outs}",
    )


def conv_layout(kernel_shape: tuple[int, ...]) -> Layout:
    """Layout of an ``nn.Conv`` kernel ``(*window, c_in, c_out)``: A is a conv, B is 1x1."""
    ins = _letters(len(kernel_shape) - 1)
    return Layout(
        kind="conv",
        in_shape=tuple(kernel_shape[:-1]),
        out_shape=(kernel_shape[-1],),
        kernel_shape=tuple(kernel_shape),
        ab=f"...{ins}{R},...{R}z->...{ins}z",
        canon=f"...{ins}z->...{ins}z",
    )


def embed_layout(kernel_shape: tuple[int, ...]) -> Layout:
    """Layout of an ``nn.Embed`` table ``(vocab, features)``: A is looked up by id, B is dense."""
    return Layout(kind="embed", in_shape=(kernel_shape[0],), out_shape=(kernel_shape[1],),
                  kernel_shape=tuple(kernel_shape))


def layout_of_param(path: str, shape: tuple[int, ...]) -> Layout:
    """Layout from the parameter alone: 2-D ``kernel`` (Dense) or 2-D ``embedding`` (Embed).

    Anything else is ambiguous without the model: pass ``layouts=lj.trace_layouts(...)``.
    """
    name = path.rsplit("/", 1)[-1]
    if len(shape) == 2 and name == "kernel":
        return dense_layout(tuple(shape), 1)
    if len(shape) == 2 and name == "embedding":
        return embed_layout(tuple(shape))
    raise ValueError(
        f"cannot tell the input and output axes of {path!r} (shape {tuple(shape)}) from the "
        "parameters alone; trace the model once: "
        "layouts = lj.trace_layouts(model, params, *example_inputs), then "
        "lj.init_adapters(params, spec, key, layouts=layouts) (for an NNX model: "
        "layouts=lj.nnx.layouts(model))"
    )


def layout_of_module(module: Any, x: Any, kernel_shape: tuple[int, ...]) -> Layout | None:
    """Layout of the kernel of a linen (or NNX) layer called on ``x``; None if not adaptable."""
    from flax import linen as nn

    name = type(module).__name__
    if isinstance(module, nn.Embed) or name == "Embed":
        return embed_layout(kernel_shape)
    if isinstance(module, nn.Conv):
        if getattr(module, "feature_group_count", 1) != 1:
            return None
        return conv_layout(kernel_shape)
    if isinstance(module, nn.Einsum) or name == "Einsum":
        return einsum_layout(module.einsum_str, kernel_shape)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            return None
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        ndim = jnp.ndim(x)
        axes = tuple(a - ndim if a >= 0 else a for a in axis)
        return dense_layout(kernel_shape, len(axes), axes)
    if isinstance(module, nn.Dense) or name == "Linear":
        return dense_layout(kernel_shape, 1)
    return None


def down(layout: Layout, x: jax.Array, a: jax.Array, module: Any = None) -> jax.Array:
    """``x·A``: the input projected to the rank axis, shape ``(..., r)``."""
    if layout.kind == "embed":
        return jnp.take(a, x, axis=0)
    if layout.kind == "conv":
        conv = module.clone(parent=None, features=a.shape[-1], use_bias=False)
        return conv.apply({"params": {"kernel": a}}, x)
    return jnp.einsum(layout.xa, x, a.astype(x.dtype))


def up(layout: Layout, h: jax.Array, b: jax.Array) -> jax.Array:
    """``h·B``: rank axis to the layer's output axes."""
    return up_einsum(layout.hb, h, b.astype(h.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def up_einsum(equation: str, h: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(equation, h, b)`` for an up-projection ``h, B -> y``, with B's gradient
    contracted as ``einsum(h, dy)``. JAX's own transpose computes it as ``einsum(dy, h)``, a
    product whose first operand is contracted over its rows, which XLA:CPU copies transposed
    first: a full copy of the layer's output gradient per adapted layer per step (a quarter of
    the default experiment's step). Here the transposed operand is ``h`` (tokens × rank)."""
    return jnp.einsum(equation, h, b)


def _up_fwd(equation, h, b):
    return jnp.einsum(equation, h, b), (h, b)


def _up_bwd(equation, res, dy):
    h, b = res
    (hs, bs), ys = equation.split("->")[0].split(","), equation.split("->")[1]
    return (jnp.einsum(f"{ys},{bs}->{hs}", dy, b).astype(h.dtype),
            jnp.einsum(f"{hs},{ys}->{bs}", h, dy).astype(b.dtype))


up_einsum.defvjp(_up_fwd, _up_bwd)


def product(layout: Layout, a: jax.Array, b: jax.Array) -> jax.Array:
    """``A·B`` in the kernel's own axis order (stacked axes leading), in float32."""
    return jnp.einsum(layout.ab, a.astype(jnp.float32), b.astype(jnp.float32))


def to_canonical(layout: Layout, w: jax.Array) -> jax.Array:
    """Kernel -> (stack..., in axes..., out axes...)."""
    return jnp.einsum(layout.canon, w)


def from_canonical(layout: Layout, w: jax.Array) -> jax.Array:
    """Inverse of ``to_canonical``."""
    src, dst = layout.canon.split("->")
    return jnp.einsum(f"{dst}->{src}", w)


def dense_axes(layout: Layout) -> tuple[str, str, str, str]:
    """(x spec, input letters, output letters, y spec) of a dense layout's einsums, so that
    ``einsum(f'{x},{ins}{outs}->{y}', x, to_canonical(layout, kernel))`` is the layer's ``x·W``."""
    x_spec, rest = layout.xa.split(",")
    ins = rest.split("->")[0].replace(R, "")
    outs = layout.hb.split(",")[1].split("->")[0].replace(R, "")
    return x_spec, ins, outs, layout.hb.split("->")[1]


def base_output(layout: Layout, x: jax.Array, kernel: jax.Array, module: Any = None) -> jax.Array:
    """``x·W`` (no bias) of one layer (stacked axes sliced off), for a dense or conv layout."""
    if layout.kind == "conv":
        conv = module.clone(parent=None, use_bias=False)
        return conv.apply({"params": {"kernel": kernel.astype(x.dtype)}}, x)
    if layout.kind != "dense":
        raise ValueError(f"no base output for a {layout.kind!r} layout")
    x_spec, ins, outs, y_spec = dense_axes(layout)
    return jnp.einsum(f"{x_spec},{ins}{outs}->{y_spec}", x,
                      to_canonical(layout, kernel).astype(x.dtype))
