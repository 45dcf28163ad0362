"""Resumable training checkpoints in a workdir (orbax), and the run's identity check.

The checkpoint is the flat list of leaves of ``(trainable, opt_state)`` plus the step; the tree
structure comes from the live run, so a structure change is caught as a mismatch, not a silent
misload. ``run.json`` records the configuration that defines the run; resuming with a different one
is an error that names the fields that differ. Nothing in the workdir is ever deleted here except
by orbax's own ``max_to_keep`` rotation of older steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {b!r} in the workdir, {a!r} now"]


def check_identity(workdir: Path, identity: dict) -> None:
    """Writes ``run.json`` on a fresh workdir; raises if it records a different run."""
    path = workdir / "run.json"
    identity = json.loads(json.dumps(identity, default=str))
    if path.exists():
        old = json.loads(path.read_text())
        diffs = _diff(identity, old)
        if diffs:
            raise ValueError(
                f"{workdir} holds a run with a different configuration ({'; '.join(diffs[:6])}). "
                "Use a new --workdir, or restore the original configuration to resume."
            )
    else:
        path.write_text(json.dumps(identity, indent=1, sort_keys=True))


class Checkpoints:
    """Save/restore ``(step, tree)`` under ``directory`` with orbax."""

    def __init__(self, directory: Path, keep: int):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def save(self, step: int, tree) -> None:
        if step in self.manager.all_steps():
            return
        leaves = {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(tree))}
        self.manager.save(step, args=ocp.args.StandardSave(leaves), force=True)

    def restore_latest(self, like):
        """Returns ``(step, tree)`` of the newest readable checkpoint, or ``(0, like)``.

        An unreadable newest checkpoint is reported and the next older one is tried.
        """
        leaves, treedef = jax.tree.flatten(like)
        abstract = {f"{i:06d}": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=getattr(x, "sharding", None))
                    for i, x in enumerate(leaves)}  # restored with the live run's shardings
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # orbax raises many types for corrupt or partial files
                print(f"checkpoint {step} in {self.manager.directory} is unreadable ({e}); "
                      "trying an older one", flush=True)
                continue
            return step, jax.tree.unflatten(treedef, [got[k] for k in sorted(got)])
        return 0, like

    def close(self) -> None:
        self.manager.close()
