"""Checkpoints: restore by path, structure errors that name paths, checksums that catch flipped
bytes, repair of a corrupt final step, rename-first rotation, async saves, and a SIGKILL loop."""

import dataclasses
import json
import multiprocessing
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.train import checkpoint
from lora_jax.train.checkpoint import CheckpointMismatch, Checkpoints

from . import ckpt_kill_child


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Node:
    """An adapter-like node: arrays plus static fields (as ``lora_jax.methods.Adapter``)."""
    a: jax.Array
    b: jax.Array
    method: str = dataclasses.field(default="lora", metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Swapped:
    """``Node`` with its array fields declared in the other order: same paths, other positions."""
    b: jax.Array
    a: jax.Array
    method: str = dataclasses.field(default="lora", metadata=dict(static=True))


def _state(seed: int = 0, rank: int = 2):
    k = jax.random.split(jax.random.key(seed), 3)
    trainable = {"blocks": {"q": Node(jax.random.normal(k[0], (8, rank)),
                                      jax.random.normal(k[1], (rank, 8))),
                            "v": Node(jnp.ones((8, rank)), jnp.zeros((rank, 8), jnp.bfloat16))},
                 "head": jax.random.normal(k[2], (8,))}
    return trainable, optax.adam(1e-3).init(trainable)


def _equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _ckpts(path, keep=3, lines=None, **kw) -> Checkpoints:
    return Checkpoints(path, keep, log=(lines.append if lines is not None else print), **kw)


def test_round_trip_is_by_path_and_keeps_static_fields(tmp_path):
    c = _ckpts(tmp_path, info={"method": "lora", "ranks": {"q": 2}})
    assert c.save(1, _state(1)) and c.save(2, _state(2))
    assert not c.save(2, _state(2))  # an intact step is not written twice
    step, got = c.restore_latest(_state(0))
    assert step == 2 and _equal(got, _state(2))
    assert got[0]["blocks"]["q"].method == "lora"
    c.close()
    # Same-shaped leaves in another order: positions differ, names do not.
    c = _ckpts(tmp_path / "swap")
    c.save(1, {"q": Node(jnp.ones((4, 4)), jnp.zeros((4, 4)))})
    _, got = c.restore_latest({"q": Swapped(jnp.full((4, 4), 7.0), jnp.full((4, 4), 7.0))})
    assert isinstance(got["q"], Swapped)
    np.testing.assert_array_equal(got["q"].a, 1.0)
    np.testing.assert_array_equal(got["q"].b, 0.0)


def test_structure_change_is_an_error_naming_paths_not_a_fallback(tmp_path):
    c = _ckpts(tmp_path, info={"method": "lora"})
    c.save(1, _state(1))
    c.save(2, _state(2))
    with pytest.raises(CheckpointMismatch, match=r"\['blocks'\]\['q'\]\.a is \(8, 2\) float32 in "
                                                 r"the checkpoint, \(8, 4\) float32 now"):
        c.restore_latest(_state(rank=4))
    renamed = ({"blocks": {"k": _state()[0]["blocks"]["q"]}}, ())
    with pytest.raises(CheckpointMismatch) as e:
        c.restore_latest(renamed)
    assert "[0]['blocks']['k'].a is not in the checkpoint" in str(e.value)
    assert "[0]['blocks']['q'].a is only in the checkpoint" in str(e.value)
    as_f16 = jax.tree.map(lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x,
                          _state())
    with pytest.raises(CheckpointMismatch, match="float16 now"):
        c.restore_latest(as_f16)
    other = _ckpts(tmp_path, info={"method": "dora"})
    with pytest.raises(CheckpointMismatch, match=r"info \['method'\] is \['lora'\] in the "
                                                 r"checkpoint, \['dora'\] now"):
        other.restore_latest(_state())


def _flip_bytes(step_dir: Path, n: int = 64) -> Path:
    """Flips ``n`` bytes in the middle of the step's largest array-data file."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    data.write_bytes(bytes(raw))
    return data


def _big_state(step):  # large enough that the data file holds raw bytes worth flipping
    return {"w": jnp.arange(64 * 1024, dtype=jnp.float32) * step, "n": jnp.asarray(step)}


def test_flipped_bytes_are_caught_and_the_previous_step_is_used(tmp_path):
    lines = []
    c = _ckpts(tmp_path, lines=lines)
    for s in (1, 2):
        c.save(s, _big_state(s))
    _flip_bytes(tmp_path / "2")
    step, got = c.restore_latest(_big_state(0))
    assert step == 1 and _equal(got, _big_state(1))
    assert len(lines) == 1 and "\n" not in lines[0] and len(lines[0]) < 200, lines
    assert lines[0].startswith("checkpoint 2 is unusable (")


def test_checksum_catches_silently_wrong_values(tmp_path):
    """Data that reads fine but is not what was saved: only the checksum can tell."""
    lines = []
    c = _ckpts(tmp_path, lines=lines)
    c.save(1, _big_state(1))
    c.save(2, _big_state(2))
    meta = tmp_path / "2" / "meta" / "metadata"  # forge: step 2's data with step 3's sums
    saved_meta = json.loads(meta.read_text())
    sums = checkpoint.checksums(checkpoint.flatten_by_path(_big_state(3))[0])
    for k, leaf in saved_meta["leaves"].items():
        leaf["checksum"] = sums[k]
    meta.write_text(json.dumps(saved_meta))
    step, _ = c.restore_latest(_big_state(0))
    assert step == 1
    assert lines == ["checkpoint 2 is unusable (checksum mismatch in ['n'] and 1 more); "
                     "trying an older step"]


def test_checksum_does_not_depend_on_sharding():
    x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("a", "b")))
    sums = [checkpoint.checksums({"x": v})["x"] for v in (x, sharded, np.asarray(x))]
    assert sums[0] == sums[1] == sums[2]
    assert checkpoint.checksums({"x": x.at[3, 5].add(1e-6)})["x"] != sums[0]
    assert checkpoint.checksums({"x": x.T.reshape(64, 8)})["x"] != sums[0]  # a permutation


def test_small_leaves_summed_together_equal_their_own_sums():
    """The joint pass over small leaves (``JOINT_MAX_WORDS``) gives each leaf's own checksum, so
    steps saved either way verify either way; every dtype family and an empty leaf."""
    rng = np.random.default_rng(0)
    leaves = [rng.normal(size=(3, 5, 7)).astype(np.float32), rng.integers(-9, 9, (4, 4), np.int8),
              jnp.asarray(rng.normal(size=(6, 2)), jnp.bfloat16), rng.random(5) > 0.5,
              np.zeros((0, 3), np.float32), (rng.normal(size=(2, 3)) + 1j).astype(np.complex64)]
    words = [checkpoint._words(jnp.asarray(x)) for x in leaves]
    joint = np.asarray(checkpoint._joint_checksums(words))
    alone = np.stack([np.asarray(checkpoint._leaf_checksum(w)) for w in words])
    np.testing.assert_array_equal(joint, alone)
    assert len({tuple(r) for r in alone}) == len(leaves)


def test_a_corrupt_final_step_is_saved_again(tmp_path):
    lines = []
    c = _ckpts(tmp_path, lines=lines)
    c.save(1, _big_state(1))
    c.save(2, _big_state(2))
    c.close()
    _flip_bytes(tmp_path / "2")
    c = _ckpts(tmp_path, lines=lines)  # a rerun, as after a kill
    assert c.save(2, _big_state(2))  # re-written, not skipped
    assert lines[0].startswith("checkpoint 2 is corrupt (") and "saving it again" in lines[0]
    lines.clear()
    step, got = c.restore_latest(_big_state(0))
    assert step == 2 and _equal(got, _big_state(2)) and lines == []
    assert not (tmp_path / checkpoint.TRASH).exists()


def test_every_step_unusable_is_an_error_not_a_restart(tmp_path):
    c = _ckpts(tmp_path, lines=[])
    c.save(1, _big_state(1))
    _flip_bytes(tmp_path / "1")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* can be restored \(step 1: "):
        c.restore_latest(_big_state(0))


def test_kill_during_deletion_leaves_a_restorable_listing(tmp_path):
    c = _ckpts(tmp_path, keep=2)
    for s in (1, 2, 3):
        c.save(s, _big_state(s))
    assert c.steps() == [2, 3] and not (tmp_path / checkpoint.TRASH).exists()
    c.close()
    # A kill after the rename and half-way through the rmtree of step 2:
    trash = tmp_path / checkpoint.TRASH
    trash.mkdir()
    (tmp_path / "2").rename(trash / "2")
    for f in list((trash / "2").rglob("*"))[::2]:
        if f.is_file():
            f.unlink()
    lines = []
    c = _ckpts(tmp_path, keep=2, lines=lines)
    assert c.steps() == [3] and not trash.exists()  # the leftover is removed on start
    step, got = c.restore_latest(_big_state(0))
    assert (step, lines) == (3, []) and _equal(got, _big_state(3))
    c.save(4, _big_state(4))
    assert c.steps() == [3, 4]


def test_async_save_round_trip(tmp_path):
    c = _ckpts(tmp_path, keep=2, async_save=True)
    for s in (1, 2, 3):
        c.save(s, _state(s))
    c.wait()
    assert c.steps() == [2, 3]
    step, got = c.restore_latest(_state(0))
    assert step == 3 and _equal(got, _state(3))
    c.close()


def test_sigkill_at_random_moments_never_leaves_a_bad_listed_step(tmp_path, monkeypatch):
    """12 processes, each killed (SIGKILL) at a random moment while saving with keep=2.

    Children are forked from a forkserver that imported lora_jax once, so each cycle costs a
    fork rather than a Python start. Every restart must resume from an intact step without any
    fallback, and make progress. A persistent compilation cache spares each child the compile.
    """
    for name, value in (("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache")),
                        ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                        ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")):
        monkeypatch.setenv(name, value)  # read by the forkserver, started below
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lora_jax.train.checkpoint"])  # 3.11 imports it from the cwd
    rng = random.Random(0)
    resumed, logs, last_saved = [], [], 0
    for cycle in range(12):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=ckpt_kill_child.run, args=(str(tmp_path / "ckpt"), child))
        proc.start()
        child.close()
        assert parent.poll(120), "the child did not resume within 120 s"
        msg = parent.recv()
        while msg[0] == "log":
            logs.append(msg[1])
            msg = parent.recv()
        resumed.append(msg)
        if cycle % 3:  # else: kill during the restore's aftermath or the first save
            while msg[0] != "saved":  # the first save compiles; kill after it, at random
                assert parent.poll(120), "the child saved nothing within 120 s"
                msg = parent.recv()
                logs += [msg[1]] if msg[0] == "log" else []
            last_saved = msg[1]
        deadline = time.monotonic() + rng.uniform(0.0, 0.6)
        while time.monotonic() < deadline:
            if parent.poll(0.005):
                msg = parent.recv()
                last_saved = msg[1] if msg[0] == "saved" else last_saved
                logs += [msg[1]] if msg[0] == "log" else []
        proc.kill()
        proc.join()
        assert proc.exitcode == -9
        parent.close()
    assert logs == [] and all(ok for _, _, ok in resumed), (logs, resumed)
    steps = [s for _, s, _ in resumed]
    assert steps == sorted(steps) and steps[-1] > steps[0], steps
    c = Checkpoints(tmp_path / "ckpt", 2)
    step, got = c.restore_latest(ckpt_kill_child.state(0))
    assert step >= last_saved > 0 and ckpt_kill_child.same(got, ckpt_kill_child.state(step))
    assert 1 <= len(c.steps()) <= 3  # 3 if the last kill fell between a save and its rotation
    flat = checkpoint.flatten_by_path(ckpt_kill_child.state(0))[0]
    for s in c.steps():  # every listed step is intact, not only the newest
        c._read(s, flat)
    c.close()


def test_identity_is_checked_and_recorded_facts_are_not(tmp_path):
    identity = {"method": "lora", "adapter": {"rank": 8}}
    first = checkpoint.check_identity(tmp_path, identity, {"data": {"t.jsonl": "sha256:aa"}})
    assert first == {"data": {"t.jsonl": "sha256:aa"}}
    again = checkpoint.check_identity(tmp_path, identity, {"data": {"t.jsonl": "sha256:bb"}})
    assert again == first  # the first run's record, for the caller to compare
    with pytest.raises(ValueError, match=r"adapter.rank: 8 in the workdir, 4 now"):
        checkpoint.check_identity(tmp_path, {"method": "lora", "adapter": {"rank": 4}})
    (tmp_path / "run.json").write_text('{"method": ')
    with pytest.raises(ValueError, match=r"run.json is truncated or corrupt .*it is the run's "
                                         r"identity: delete it"):
        checkpoint.check_identity(tmp_path, identity)
