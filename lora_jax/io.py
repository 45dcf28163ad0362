"""Saving and loading adapters (msgpack arrays + a JSON spec) and parameter trees (orbax).

An exported adapter is a directory with ``adapters.msgpack`` (the arrays, keyed by kernel path)
and ``spec.json`` (per path: method name and arguments, scale, layout, dropout; plus free-form
metadata such as the ``LoraSpec`` and the model it was trained on). ``load_adapters`` rebuilds
the ``Adapter`` nodes and, given the base parameters, checks every path and shape before anything
runs; adapter files are small and written by one process, with ``atomic_write`` (a kill leaves
the old file or the new one, never a torn one). A parameter tree (a merged or fully fine-tuned
model) is as big as the model, so ``save_params`` writes it as an orbax checkpoint directory in
which each process writes only the shards it holds, and ``load_params`` reads it whole on the
host or straight into shards. PEFT's safetensors format lives in ``interop.py``; training
checkpoints (orbax too) in ``train/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
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


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a kill at any moment leaves the old file or the new one.

    The bytes go to a temporary file beside ``path`` (unique per process), are fsynced, and
    replace ``path`` with ``os.replace``; the directory is fsynced so the rename survives too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Reads JSON from ``path``; an empty or truncated file is a one-line ``ValueError``.

    ``what`` says what the user should do about a broken file, e.g. "delete it and rerun to
    recompute the base evaluation". A missing file raises ``FileNotFoundError`` as usual.
    """
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        state = "empty" if not text.strip() else f"truncated or corrupt ({e.msg} at line {e.lineno})"
        raise ValueError(f"{path} is {state}; {what}") from None


def save_adapters(directory: str | os.PathLike, adapters, metadata: Mapping[str, Any] = ()) -> None:
    """Writes ``adapters`` (and JSON-able ``metadata``) to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    flat = rules.flatten(adapters)
    arrays = {p: {"params": jax.device_get(a.params), "state": jax.device_get(a.state)}
              for p, a in flat.items()}
    spec = {p: {"method": a.method.name, "args": _method_args(a.method), "scale": a.scale,
                "dropout": a.dropout, "tied_head": a.tied_head,
                "layout": dataclasses.asdict(a.layout)}
            for p, a in flat.items()}
    atomic_write(out / ARRAYS, serialization.msgpack_serialize(arrays))
    atomic_write(out / SPEC, json.dumps({"adapters": spec, "metadata": dict(metadata)},
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
    spec = read_json(src / SPEC, "export the adapter again")
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
            _method(meta), meta["scale"], _layout(meta["layout"]), meta["dropout"],
            meta.get("tied_head", True))
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


# orbax writes a replicated array from all its replicas, a slice each, when each slice has at
# least this many bytes. Below it, one replica writes the whole array: each slice costs a
# dispatched (and once per shape, compiled) slicing op, which for small leaves (norms, biases,
# adapters) takes far longer than the write it splits (a tiny run's checkpoint: 48 compiled
# slices, most of its time; a 36-leaf export here: 1 s against 0.2 s).
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def array_handlers():
    """orbax's type handlers for what lora_jax writes (parameter trees here, training checkpoints
    in ``train/checkpoint.py``): jax, numpy and scalar leaves, ``REPLICA_PARALLEL_MIN_BYTES``."""
    import orbax.checkpoint as ocp  # noqa: PLC0415 (slow to import; the adapter files need none)

    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)),
        (np.ndarray, th.NumpyHandler()), (np.number, th.ScalarHandler()))


def save_params(path: str | os.PathLike, params) -> None:
    """Writes a parameter tree (nested dicts of arrays) as the orbax checkpoint directory ``path``.

    Every process of a multi-process run calls it with the same ``path``. A ``jax.Array`` is
    written shard by shard, each process writing the shards it holds (one replica of each), so
    no array is ever gathered onto one device or host; numpy leaves are written by process 0. An
    existing ``path`` is replaced. orbax writes into a temporary directory and renames it once
    every process is done, so ``path`` never holds a torn tree. Read it with ``load_params``.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=array_handlers())
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(params), force=True)


def load_params(path: str | os.PathLike, like=None):
    """The tree ``save_params`` wrote at ``path``, in one process or several (every process calls
    it; the number of processes and devices need not be the writer's).

    ``like=None``: numpy arrays on the host; each process reads every byte (an export read for
    inference or a comparison). ``like``: a tree of the same structure whose leaves are arrays or
    ``jax.ShapeDtypeStruct``s with shardings: ``jax.Array``s placed like them, each process
    reading only the bytes of its own shards.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    src = Path(path).absolute()
    if src.is_file():
        raise ValueError(f"{src} is a file, not a parameter directory: lora_jax writes parameter "
                         "trees as orbax checkpoint directories (io.save_params); an older "
                         "msgpack export reads with flax.serialization.msgpack_restore")
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is missing: no parameter tree was exported there")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            if like is None:
                tree = ckptr.metadata(src).item_metadata.tree
                args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
                return ckptr.restore(src, args=ocp.args.PyTreeRestore(restore_args=args))
            like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), like)
            return ckptr.restore(src, args=ocp.args.PyTreeRestore(
                like, restore_args=ocp.checkpoint_utils.construct_restore_args(like)))
    except Exception as e:  # orbax raises many types for missing or damaged files
        raise ValueError(f"{src} is not a readable parameter tree: {e}") from None
