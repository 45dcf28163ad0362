"""Gradient accumulation (``train.microbatches``): a batch taken in slices gives the one-batch
step's losses and parameters, on one device and on the 8-device ``fsdp`` mesh, because slices are
weighted by their loss-mask sums (an unweighted mean of slice losses would differ)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import sharding
from lora_jax.train import Experiment, from_dict, trainer
from lora_jax.train import steps
from lora_jax.train.config import MeshConfig
from tests.train.test_trainer import load_config, tiny

RTOL = 2e-5  # float32: only the order of the sums differs


def _cfg(mesh: MeshConfig, batch_size: int, **train) -> Experiment:
    cfg = tiny(from_dict(Experiment, load_config("lora").to_dict()), steps=3)
    return dataclasses.replace(cfg, mesh=mesh, optim=dataclasses.replace(cfg.optim, warmup_steps=1),
                               train=dataclasses.replace(cfg.train, batch_size=batch_size,
                                                         **train))


def _data(cfg):
    tok = trainer.D.get_tokenizer("byte")
    model, _, _ = trainer.build_model(cfg.model, tok.vocab_size)
    train, _, _ = trainer.load_data(cfg.data, tok)
    return model, train, jnp.zeros((1, cfg.data.seq_len), jnp.int32)


def test_accumulated_loss_and_gradients_equal_the_whole_batchs():
    cfg = _cfg(MeshConfig(num_devices=1), 8)
    model, train, example = _data(cfg)
    setup = trainer.make_setup(cfg, model, trainer.base_params(cfg, model, None, example), example)
    batch = trainer.D.ArrayLoader(train, 8, seed=0).batch(0)
    loss_fn = trainer.make_loss(setup)
    run = lambda k, weight: jax.jit(steps.accumulated(loss_fn, k, weight))(
        setup.trainable, setup.frozen, batch, None)
    (whole, g_whole), (weighted, g_weighted) = run(1, None), run(4, setup.objective.weight)
    assert len({float(batch["loss_mask"][i::4].sum()) for i in range(4)}) > 1
    np.testing.assert_allclose(weighted, whole, rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), g_weighted,
                 g_whole)
    plain = float(run(4, None)[0])  # slices weighted by rows: a plain mean of their losses
    assert abs(plain - float(whole)) > 1e-3 * float(whole)


def test_trainer_steps_with_microbatches_on_fsdp_equal_one_batch_steps():
    cfg = _cfg(MeshConfig(preset="fsdp"), 16)
    model, train, example = _data(cfg)
    setup, sh = trainer.prepare(cfg, model, None, example)
    batches = [sharding.shard_batch(trainer.D.ArrayLoader(train, 16, seed=0).batch(i), sh.mesh)
               for i in range(2)]
    results = []
    for k in (1, 2):
        step, _ = trainer.make_steps(setup, sh, k)
        t = jax.tree.map(jnp.copy, setup.trainable)  # the step donates its trainable tree
        o = jax.jit(setup.tx.init, out_shardings=sh.opt_state)(t)
        losses = []
        for i, b in enumerate(batches):
            t, o, out = step(t, o, setup.frozen, b, jax.random.key(i))
            losses.append(float(out["loss"]))
        results.append((losses, t))
    (one, t_one), (two, t_two) = results
    np.testing.assert_allclose(two, one, rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7), t_two, t_one)
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(t_two),
                                               jax.tree.leaves(sh.trainable)))


def test_microbatches_must_split_the_batch():
    with pytest.raises(ValueError, match="train.microbatches=3"):
        trainer.validate(_cfg(MeshConfig(), 8, microbatches=3))
    cfg = _cfg(MeshConfig(preset="fsdp"), 8, microbatches=2)
    model, _, _ = trainer.build_model(cfg.model, 320)
    with pytest.raises(ValueError, match=r"train.batch_size / train.microbatches=4"):
        trainer.prepare(cfg, model, None, jnp.zeros((1, cfg.data.seq_len), jnp.int32))
