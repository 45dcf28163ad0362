"""Saving and loading adapters and parameter trees as files (msgpack arrays + a JSON spec).

An exported adapter is a directory with ``adapters.msgpack`` (the arrays, keyed by kernel path)
and ``spec.json`` (per path: method name and arguments, scale, layout, dropout; plus free-form metadata such
as the ``LoraSpec`` and the model it was trained on). ``load_adapters`` rebuilds the ``Adapter``
nodes and, given the base parameters, checks every path and shape before anything runs. PEFT's
safetensors format lives in ``interop/``; training checkpoints (orbax) in ``train/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization

from lora_jax import methods, rules
from lora_jax.layers import Layout
from lora_jax.methods import Adapter

ARRAYS = "adapters.msgpack"
SPEC = "spec.json"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_adapters(directory: str | os.PathLike, adapters, metadata: Mapping[str, Any] = ()) -> None:
    """Writes ``adapters`` (and JSON-able ``metadata``) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    flat = rules.flatten(adapters)
    arrays = {p: {"params": jax.device_get(a.params), "state": jax.device_get(a.state)}
              for p, a in flat.items()}
    spec = {p: {"method": a.method.name, "args": _method_args(a.method), "scale": a.scale,
                "dropout": a.dropout, "layout": dataclasses.asdict(a.layout)}
            for p, a in flat.items()}
    _atomic_write(out / ARRAYS, serialization.msgpack_serialize(arrays))
    _atomic_write(out / SPEC, json.dumps({"adapters": spec, "metadata": dict(metadata)},
                                         indent=1, default=str).encode())


def _method_args(method) -> dict:
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}


def _method(meta: Mapping[str, Any]):
    """The method object of one spec entry (files of lora_jax <= 0.1 stored 'options' pairs)."""
    args = meta.get("args", dict(map(tuple, meta.get("options", ()))))
    name = {"full": "saved"}.get(meta["method"], meta["method"])
    return methods.make(name, **args)


def _layout(d: Mapping[str, Any]) -> Layout:
    return Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_adapters(directory: str | os.PathLike, params: Mapping[str, Any] | None = None):
    """Reads adapters written by ``save_adapters``; checks them against ``params`` if given.

    Returns ``(adapters, metadata)``.
    """
    src = Path(directory)
    for name in (ARRAYS, SPEC):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} is missing: is {src} an exported adapter?")
    spec = json.loads((src / SPEC).read_text())
    try:
        arrays = serialization.msgpack_restore((src / ARRAYS).read_bytes())
    except Exception as e:  # msgpack raises several types for truncated / corrupt files
        raise ValueError(f"{src / ARRAYS} is corrupt: {e}") from None
    flat = {}
    for path, meta in spec["adapters"].items():
        if path not in arrays:
            raise ValueError(f"{src / ARRAYS} has no arrays for {path!r}")
        flat[path] = Adapter(
            dict(arrays[path].get("params", {})), dict(arrays[path].get("state", {})),
            _method(meta), meta["scale"], _layout(meta["layout"]), meta["dropout"])
    adapters = rules.unflatten(flat)
    if params is not None:
        check_fits(params, adapters)
    return adapters, spec.get("metadata", {})


def check_fits(params: Mapping[str, Any], adapters) -> None:
    """Raises ``ValueError`` unless every adapter has a kernel of the shape it was made for."""
    flat = rules.flatten(params)
    for path, a in rules.flatten(adapters).items():
        if path not in flat:
            raise ValueError(f"adapter path {path!r} is not in the parameters")
        shape = tuple(np.shape(flat[path]))[a.layout.n_stack:]
        if a.layout.kind != "full" and shape != a.layout.kernel_shape:
            raise ValueError(f"adapter for {path!r} expects kernel {a.layout.kernel_shape}, "
                             f"the parameters have {shape}")


def save_params(path: str | os.PathLike, params) -> None:
    """Writes a parameter tree (nested dicts of arrays) as msgpack."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(path), serialization.msgpack_serialize(jax.device_get(params)))


def load_params(path: str | os.PathLike):
    """Reads a tree written by ``save_params``."""
    try:
        return serialization.msgpack_restore(Path(path).read_bytes())
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
