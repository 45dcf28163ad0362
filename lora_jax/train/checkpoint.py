"""Resumable training checkpoints keyed by path, with checksums (orbax), and the run identity.

A step is one orbax checkpoint of two items: ``state``, the tree flattened to ``{path: array}``
(``jax.tree_util.keystr`` names each leaf, e.g. ``"[0]['dense']['kernel'].params['a']"``), and
``meta``, a JSON of the caller's ``info`` plus each leaf's shape, dtype and checksum. Restoring
matches leaves by path, so reordered fields cannot misload; a tree whose paths, shapes, dtypes
or ``info`` differ from the checkpoint is a ``CheckpointMismatch`` naming them. Only a step that
cannot be read, or whose data fails its checksum, is skipped for an older one, in one log line.
The checksum is computed by a jitted integer reduction over the *global* array, so it does not
depend on the sharding or the number of processes (1x8 and 2x4 runs read each other's steps).
Old steps are renamed into ``<dir>/deleting/`` (orbax's ``todelete_subdir``) before removal, so a
kill never leaves a half-deleted step in the listing. ``run.json`` (the run's identity) is
checked by ``check_identity``. The workdir's other files and its lock live in ``workdir.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from lora_jax import io
from lora_jax.train.workdir import read_json, write_json

TRASH = "deleting"  # orbax's todelete_subdir: rotated steps are renamed here, then removed
FORMAT = 1
CHECKSUM = "sum of murmur3-mixed 32-bit words and indices, 2 x 32 bits, over the global array"


class CheckpointMismatch(ValueError):
    """The checkpoint's paths, shapes, dtypes or info differ from the state being restored."""


class _Unusable(Exception):
    """A step whose data is unreadable or corrupt; the message is the reason."""


# ----------------------------------------------------------------------------- trees and sums


def flatten_by_path(tree) -> tuple[dict[str, Any], Any]:
    """``({keystr(path): leaf}, treedef)``: every leaf of any pytree, named by its path."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {jax.tree_util.keystr(p): x if hasattr(x, "dtype") else np.asarray(x) for p, x in pairs}
    if len(flat) != len(pairs):
        raise ValueError("two leaves of the tree have the same path name; checkpoints need "
                         "unique paths (rename a dict key or a dataclass field)")
    return flat, treedef


def _fmix(h):
    """murmur3's 32-bit finaliser (uint32 arithmetic wraps)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x):
    """The array's bytes as uint32 words: ``(*shape)`` or ``(*shape, 2)`` for 64-bit types."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return _words(jnp.stack([x.real, x.imag], -1))
    size = x.dtype.itemsize
    if size in (4, 8):
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    raise TypeError(f"cannot checksum dtype {x.dtype}; convert the leaf before checkpointing")


_SEEDS = (0x9E3779B9, 0x7F4A7C15)
# Leaves of at most this many 32-bit words are summed together, in one pass over their
# concatenation: the program then holds a few operations per leaf instead of ~30 (it is compiled
# once per tree, so a tiny run paid most of a second for it). Bigger leaves, and leaves sharded
# explicitly (in their type), keep a reduction each, which never reshapes a sharded array.
JOINT_MAX_WORDS = 1 << 18


def _mix(w, index, seed: int):
    return _fmix(w ^ _fmix(index + jnp.uint32(seed)))


def _leaf_checksum(w):
    """``uint32[2]``: two order-independent sums of mixed (word, index) pairs over ``w``
    (``_words`` of a leaf), the index being the word's row-major position.

    Integer sums are exact in any order, so the value is the same for every sharding.
    """
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    return jnp.stack([jnp.sum(_mix(w, index, seed), dtype=jnp.uint32) for seed in _SEEDS])


def _joint_checksums(ws: list):
    """``uint32[len(ws), 2]``: ``_leaf_checksum`` of each of ``ws`` (small word arrays)."""
    w = jnp.concatenate([x.reshape(-1) for x in ws])
    index = jnp.concatenate([lax.iota(jnp.uint32, x.size) for x in ws])
    leaf = jnp.concatenate([jnp.full(x.size, i, jnp.int32) for i, x in enumerate(ws)])
    return jnp.stack([jax.ops.segment_sum(_mix(w, index, seed), leaf, len(ws))
                      for seed in _SEEDS], -1)


@jax.jit
def _checksum_arrays(flat: dict) -> dict:
    words = {k: _words(jnp.asarray(v)) for k, v in flat.items()}
    joint = [k for k, w in words.items() if w.size <= JOINT_MAX_WORDS
             and not any(jax.typeof(w).sharding.spec)]
    out = {k: _leaf_checksum(w) for k, w in words.items() if k not in joint}
    if joint:
        out.update(zip(joint, _joint_checksums([words[k] for k in joint])))
    return out


def _to_host(x) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def checksums(flat: dict[str, Any]) -> dict[str, str]:
    """``{path: 16 hex digits}`` of each array's global value (all processes must call it)."""
    return {k: "".join(f"{int(v):08x}" for v in _to_host(s))
            for k, s in _checksum_arrays(flat).items()}


def _all_agree(ok: bool) -> bool:
    """True where every process says ``ok`` (so all skip or all use a step together)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:120]


def _leaf_spec(x) -> dict:
    return {"shape": [int(d) for d in np.shape(x)], "dtype": str(np.dtype(x.dtype))}


def _structure_diffs(saved: dict, flat: dict) -> list[str]:
    """What differs between the saved leaves' specs and ``flat``'s, one phrase per path."""
    diffs = [f"{k} is not in the checkpoint" for k in flat if k not in saved]
    diffs += [f"{k} is only in the checkpoint" for k in saved if k not in flat]
    for k, x in flat.items():
        if k in saved:
            was, now = {n: saved[k][n] for n in ("shape", "dtype")}, _leaf_spec(x)
            if was != now:
                diffs.append(f"{k} is {tuple(was['shape'])} {was['dtype']} in the checkpoint, "
                             f"{tuple(now['shape'])} {now['dtype']} now")
    return diffs


def _print0(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Save/restore ``(step, tree)`` under ``directory``, keeping the newest ``keep`` steps.

    ``info`` (JSON-able, e.g. ``{'method': 'lora', 'ranks': {...}}``) is stored with every step
    and must be equal on restore. ``async_save=True`` writes in the background; ``wait()``
    blocks until the last save is on disk. ``log`` gets the one-line fallback messages.
    All processes of a multi-process run must make the same calls.
    """

    def __init__(self, directory: str | Path, keep: int, *, info: dict | None = None,
                 async_save: bool = False, log: Callable[[str], None] = _print0):
        self.directory = Path(directory).absolute()
        self.info = None if info is None else _json_plain(info)
        self.log = log
        self.async_save = async_save
        self._intact: set[int] = set()  # steps this object saved or verified
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(
                               type_handler_registry=io.array_handlers()),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                todelete_subdir=TRASH, cleanup_tmp_directories=True))
        self._empty_trash()

    def _empty_trash(self) -> None:
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def steps(self) -> list[int]:
        """The listed (finalised) steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, tree) -> bool:
        """Writes ``tree`` as ``step``; False if an intact ``step`` is already there.

        An existing ``step`` that is corrupt is replaced (so a damaged final step is repaired);
        one saved from a different structure raises ``CheckpointMismatch``. A step that this
        object wrote or restored is not read back.
        """
        self.wait()
        self._empty_trash()
        flat, _ = flatten_by_path(tree)
        if step in self._intact and step in self.manager.all_steps():
            return False
        if step in self.manager.all_steps():
            try:
                self._read(step, flat)
                return False
            except _Unusable as e:
                self.log(f"checkpoint {step} is corrupt ({e}); saving it again")
                self.manager.delete(step)  # renamed into TRASH first
                self._empty_trash()
        sums = checksums(flat)
        meta = {"format": FORMAT, "step": step, "info": self.info or {}, "checksum": CHECKSUM,
                "leaves": {k: {**_leaf_spec(x), "checksum": sums[k]} for k, x in flat.items()}}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(flat), meta=ocp.args.JsonSave(meta)), force=True)
        self._intact.add(step)
        if not self.async_save:  # rotation is done: remove what it renamed away
            self._empty_trash()
        return True

    def _check_structure(self, step: int, meta: dict, flat: dict) -> None:
        """Raises ``CheckpointMismatch`` naming what differs between ``meta`` and ``flat``."""
        diffs = _structure_diffs(meta["leaves"], flat)
        if self.info is not None and meta["info"] != self.info:
            keys = sorted(k for k in set(meta["info"]) | set(self.info)
                          if meta["info"].get(k) != self.info.get(k))
            diffs.append(f"info {keys} is {[meta['info'].get(k) for k in keys]} in the "
                         f"checkpoint, {[self.info.get(k) for k in keys]} now")
        if diffs:
            more = f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""
            raise CheckpointMismatch(
                f"checkpoint {step} in {self.directory} does not match the state to restore: "
                f"{'; '.join(diffs[:6])}{more}. The model, method or config changed since it was "
                "saved: use a new --workdir, or the configuration it was saved with.")

    def _read(self, step: int, flat: dict) -> dict:
        """The verified ``{path: array}`` of ``step``, placed like ``flat``'s leaves.

        Raises ``_Unusable`` (unreadable or failed checksum) or ``CheckpointMismatch``.
        """
        meta, reason = None, "metadata missing or of an unknown format (an older lora_jax?)"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for missing or damaged files
            reason = f"metadata unreadable: {_short(e)}"
        if not _all_agree(isinstance(meta, dict) and meta.get("format") == FORMAT):
            raise _Unusable(reason)
        self._check_structure(step, meta, flat)
        abstract = {k: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                            sharding=getattr(x, "sharding", None))
                    for k, x in flat.items()}  # restored with the live run's shardings
        got, reason = None, "unreadable on another process"
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
            ))["state"]
        except Exception as e:  # orbax raises many types for missing or damaged files
            reason = f"unreadable: {_short(e)}"
        if not _all_agree(got is not None):
            raise _Unusable(reason)
        sums = checksums(got)
        bad = [k for k in flat if sums[k] != meta["leaves"][k]["checksum"]]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise _Unusable(f"checksum mismatch in {bad[0]}{more}")
        return got

    def restore_latest(self, like):
        """``(step, tree)`` of the newest intact step, shaped and placed like ``like``.

        Returns ``(0, like)`` when there is no step. An unreadable or corrupt step is logged in
        one line and the next older one is tried; if every step is unusable, raises
        ``RuntimeError``. A structure mismatch raises ``CheckpointMismatch`` at once.
        """
        self.wait()
        self.manager.reload()
        flat, treedef = flatten_by_path(like)
        reasons = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self._read(step, flat)
            except _Unusable as e:
                self.log(f"checkpoint {step} is unusable ({e}); trying an older step")
                reasons.append(f"step {step}: {e}")
                continue
            self._intact.add(step)
            return step, jax.tree_util.tree_unflatten(treedef, [got[k] for k in flat])
        if reasons:
            raise RuntimeError(f"no checkpoint in {self.directory} can be restored "
                               f"({'; '.join(reasons)}); move the directory away to start over")
        return 0, like

    def wait(self) -> None:
        """Blocks until an asynchronous save has finished (a no-op when saving synchronously)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        self._empty_trash()


# ----------------------------------------------------------------------------- run identity


def _json_plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {b!r} in the workdir, {a!r} now"]


def check_identity(workdir: Path, identity: dict, recorded: dict | None = None) -> dict:
    """Writes ``run.json`` on a fresh workdir; raises if it records a different run.

    ``identity`` must match on every resume. ``recorded`` (environment, data digests) is
    written under the key ``"recorded"`` on the first run and never compared here; the
    first run's ``recorded`` is returned so the caller can check what it needs (data digests).
    """
    path = Path(workdir) / "run.json"
    identity = _json_plain(identity)
    if not path.exists():
        write_json(path, {**identity, "recorded": recorded or {}})
        return _json_plain(recorded or {})
    old = read_json(path, "it is the run's identity: delete it to re-create it from the current "
                          "configuration (only if that configuration is the run's)")
    first = old.pop("recorded", {})
    diffs = _diff(identity, old)
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different configuration ({'; '.join(diffs[:6])}). "
            "Use a new --workdir, or restore the original configuration to resume.")
    return first
