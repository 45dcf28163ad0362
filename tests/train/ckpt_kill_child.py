"""The process that test_checkpoint's SIGKILL loop kills: it resumes from the newest intact
checkpoint, checks it against the known state of that step, then saves step after step with
rotation (keep=2), reporting each event over a pipe until it is killed."""

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.train.checkpoint import Checkpoints


def state(step: int) -> dict:
    """The training state of ``step``: a few hundred KB, so a save takes a while."""
    base = np.arange(128 * 256, dtype=np.float32).reshape(128, 256)
    return {"params": {"w": jnp.asarray(base + step), "b": jnp.full((256,), step, jnp.bfloat16)},
            "opt": (jnp.asarray(step, jnp.int32), {"mu": jnp.asarray(base * step)})}


def same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(directory: str, conn, last_step: int = 10_000) -> None:
    """Resume, verify, then save ``step + 1, step + 2, ...``; every event goes to ``conn``."""
    ckpts = Checkpoints(directory, keep=2, log=lambda msg: conn.send(("log", msg)))
    step, got = ckpts.restore_latest(state(0))
    conn.send(("resumed", step, same(got, state(step))))
    for s in range(step + 1, last_step + 1):
        ckpts.save(s, state(s))
        conn.send(("saved", s))
    ckpts.close()
