"""The trainer: one real step of every config and sweep point, no recompilation, exact resume,
summary.json, and clear errors for bad input."""

import dataclasses
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from lora_jax.train import Experiment, from_dict, train_and_evaluate, trainer
from lora_jax.train.config import to_dict
from tests.procs import child_env

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = "d_model=32,n_layers=2,n_head=2,n_positions=32,vocab_size=320"
TINY_OVERRIDES = {
    "gpt2": TINY_MODEL,
    "llama": "d_model=32,n_layers=2,n_heads=2,n_kv_heads=1,d_ff=64,max_seq_len=32,vocab_size=320",
}
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))


def tiny(cfg: Experiment, steps: int = 2) -> Experiment:
    """Shrinks any experiment to a few seconds: a 2-layer d=32 model from a random init, wider
    when the adapter rank needs it (rank <= min(d_in, d_out) of every adapted kernel), on one
    device (the 8-device meshes are tests/test_sharding.py's and test_conformance.py's: a tiny
    run compiles and steps a fifth faster unpartitioned). The encoder families (bert, vit) keep
    their config's overrides (the head) on the tiny preset."""
    overrides = TINY_OVERRIDES.get(cfg.model.family, cfg.model.overrides)
    width = _width(cfg)
    if width > 32 and cfg.model.family in TINY_OVERRIDES:
        overrides += f",d_model={width}" + (f",d_ff={width},n_kv_heads=2"
                                            if cfg.model.family == "llama" else "")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, preset="tiny", overrides=overrides, hf_path=""),
        base=dataclasses.replace(cfg.base, source="init"),
        mesh=dataclasses.replace(cfg.mesh, num_devices=1, fsdp2=0),  # the large configs: 8
        data=dataclasses.replace(cfg.data, n_train_per_task=16, n_eval_per_task=8, seq_len=24),
        train=dataclasses.replace(cfg.train, steps=steps, batch_size=8, eval_every=1000,
                                  log_every=1, checkpoint_every=1000, eval_batch_size=16),
    )


def _width(cfg: Experiment) -> int:
    return max(32, cfg.adapter.rank)


def load_config(name: str, arg: str = ""):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_and_trains_one_step(name, tmp_path):
    cfg = tiny(from_dict(Experiment, load_config(name).to_dict()), steps=1)
    summary = train_and_evaluate(cfg, tmp_path)
    assert summary["steps"] == 1 and np.isfinite(summary["final_eval_loss"])


def _structure(cfg: Experiment) -> tuple:
    """What decides the compiled program's code paths, as opposed to the scalar hyperparameters
    (lr, alpha, τ, β, target sparsity, ...) that only change constants in it, and the sizes (rank,
    MTL's up-projections, MultiLoRA's count) that only change shapes in it: every point's
    adapters are built for its shapes, abstractly, in ``test_every_sweep_point...``."""
    a, m = cfg.adapter, cfg.method_args
    return (cfg.method, cfg.model.family, cfg.model.scan_layers, a.targets, a.modules_to_save,
            cfg.quant.kind, m.get("init_weights"), m.get("lora_plus_ratio", 0) > 0,
            m.get("pattern"), m.get("masked"), m.get("layerwise"), m.get("pruner"),
            bool(m.get("diagonal")))


def _sweep_point(name: str, overrides: dict) -> Experiment:
    module = importlib.import_module(f"configs.{name}")
    return tiny(from_dict(Experiment, common.apply_overrides(module.get_config(""),
                                                             overrides).to_dict()), steps=1)


@functools.cache
def _structure_owners() -> dict:
    """Each program structure of any config's sweep -> the first config (in ``CONFIGS`` order)
    whose sweep has it; the structures of the configs' defaults (which
    ``test_every_config_builds_and_trains_one_step`` trains) are left out."""
    defaults = {_structure(tiny(from_dict(Experiment, load_config(n).to_dict()), steps=1))
                for n in CONFIGS}
    owners = {}
    for name in CONFIGS:
        for overrides in importlib.import_module(f"configs.{name}").get_sweep(""):
            owners.setdefault(_structure(_sweep_point(name, overrides)), name)
    return {s: n for s, n in owners.items() if s not in defaults}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_sweep_point_builds_and_trains_one_step(name, tmp_path):
    """Every point is built (config -> dataclasses -> adapters on the tiny model); one jitted
    training step runs for every distinct program structure (see ``_structure``) of all the
    sweeps, once in the suite: here if this config's sweep is the first to have it and no
    config's default has it. The harness around the step (evals, checkpoints, export, method
    callbacks) is ``test_every_config_builds_and_trains_one_step``'s."""
    points = importlib.import_module(f"configs.{name}").get_sweep("")
    assert points, f"configs/{name}.py has an empty sweep"
    owners, ran = _structure_owners(), set()
    for i, overrides in enumerate(points):
        cfg = _sweep_point(name, overrides)
        if not cfg.full_finetune:
            kind = trainer.D.get_kind(cfg.data.kind)
            vocab = trainer.D.vocab_size(kind.tokenizer(cfg.data))
            model, _, _ = trainer.build_model(cfg.model, vocab)
            example = jnp.asarray(kind.example(cfg.data))
            params = jax.eval_shape(lambda: trainer.base_params(cfg, model, None, example))
            layouts = trainer.lj.trace_layouts(model, params, example)
            jax.eval_shape(lambda p: trainer.lj.init_adapters(
                p, trainer.adapter_spec(cfg), jax.random.key(0), layouts=layouts), params)
        if owners.get(_structure(cfg)) == name and _structure(cfg) not in ran:
            ran.add(_structure(cfg))
            _one_step(cfg)


def _one_step(cfg: Experiment) -> None:
    """Builds the run's model, base, adapters and optimizer as the trainer does, on one device,
    and takes one training step (the first: a warmup's learning rate is 0 there)."""
    kind = trainer.D.get_kind(cfg.data.kind)
    tokenizer = kind.tokenizer(cfg.data)
    model, _, _ = trainer.build_model(cfg.model, trainer.D.vocab_size(tokenizer))
    train, _, _ = trainer.load_data(cfg.data, tokenizer)
    example = jnp.asarray(kind.example(cfg.data))
    params = trainer.quantize_base(cfg, model, trainer.base_params(cfg, model, None, example),
                                   example)
    setup = trainer.make_setup(cfg, model, params, example)
    train_step, _ = trainer.make_steps(setup)
    batch = trainer.D.ArrayLoader(train, cfg.train.batch_size, seed=0).batch(0)
    _, _, out = train_step(setup.trainable, setup.tx.init(setup.trainable), setup.frozen, batch,
                           jax.random.key(0))
    assert bool(out["finite"]) and float(out["grad_norm"]) > 0  # the gradient reaches the adapters


def _lora_tiny(**train):
    cfg = tiny(from_dict(Experiment, load_config("lora").to_dict()), steps=6)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_step_does_not_recompile():
    cfg = _lora_tiny()
    tok = trainer.D.get_tokenizer("byte")
    model, _, _ = trainer.build_model(cfg.model, tok.vocab_size)
    train, _, _ = trainer.load_data(cfg.data, tok)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = trainer.base_params(cfg, model, None, example)
    setup = trainer.make_setup(cfg, model, params, example)
    train_step, _ = trainer.make_steps(setup)
    t, o = setup.trainable, setup.tx.init(setup.trainable)
    loader = trainer.D.ArrayLoader(train, 8, seed=0)
    losses = []
    for step in range(3):
        t, o, out = train_step(t, o, setup.frozen, loader.batch(step), jax.random.key(step))
        losses.append(float(out["loss"]))
    assert train_step._cache_size() == 1
    assert losses[-1] < losses[0]


def test_summary_and_outputs(tmp_path):
    summary = train_and_evaluate(_lora_tiny(), tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    for key in ("method", "model", "trainable_params", "total_params", "steps", "train_seconds",
                "final_eval_loss", "base_accuracy", "accuracy"):
        assert key in summary, key
    assert summary["method"] == "lora" and summary["steps"] == 6
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert set(summary["accuracy"]) == {"digits_reverse", "kv_recall", "mean"}
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "adapter" / "adapters.msgpack").exists()
    assert any((tmp_path / "tb").iterdir())


def _losses(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.parametrize("async_checkpoints", [False, True])
def test_resumed_run_reproduces_losses_exactly(tmp_path, monkeypatch, async_checkpoints):
    cfg = _lora_tiny(checkpoint_every=1000, async_checkpoints=async_checkpoints)
    train_and_evaluate(cfg, tmp_path / "straight")
    # Interrupt a second run with a real SIGTERM right after step 3 is logged.
    write = trainer.MetricsWriter.write

    def write_then_term(self, step, split, **values):
        write(self, step, split, **values)
        if split == "train" and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.MetricsWriter, "write", write_then_term)
    out = train_and_evaluate(cfg, tmp_path / "resumed")
    assert out == {"interrupted": True, "step": 3}
    assert not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.setattr(trainer.MetricsWriter, "write", write)
    train_and_evaluate(cfg, tmp_path / "resumed")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_checkpoints_and_rerun_resumes(tmp_path):
    """A real process killed with SIGTERM mid-run, then rerun: same losses as uninterrupted."""
    args = [sys.executable, "-m", "experiments.train", "--config=configs/lora.py:steps=40",
            "--config.base.source=init", f"--config.model.overrides={TINY_MODEL}",
            "--config.data.n_train_per_task=64", "--config.data.n_eval_per_task=8",
            "--config.data.seq_len=24", "--config.train.batch_size=8",
            "--config.train.log_every=1", "--config.train.checkpoint_every=1000"]
    env = child_env()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(args + [f"--workdir={straight}"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    # The child pauses after logging step 5 until the signal arrives: a 40-step tiny run can
    # otherwise finish before a signal sent "after step 5" reaches it.
    pause = [sys.executable, "-m", "tests.train.pause_child", "5", *args[3:]]
    proc = subprocess.Popen(pause + [f"--workdir={killed}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in iter(proc.stdout.readline, b""):
        if line.startswith(b"paused at step 5"):
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out
    assert "SIGTERM: checkpointed step 5" in out
    assert not (killed / "summary.json").exists()
    subprocess.run(args + [f"--workdir={killed}"], cwd=ROOT, env=env, check=True,
                   capture_output=True)

    assert _losses(killed) == _losses(straight)
    assert len(_losses(straight)) == 40


# ----------------------------------------------------------------------------- bad input


def test_unknown_config_field_is_an_error():
    values = to_dict(Experiment())
    values["optim"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\] in config.optim"):
        from_dict(Experiment, values)


def test_workdir_of_another_run_is_refused_and_kept(tmp_path):
    train_and_evaluate(_lora_tiny(), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = dataclasses.replace(_lora_tiny(), adapter=dataclasses.replace(
        _lora_tiny().adapter, rank=4))
    with pytest.raises(ValueError, match=r"different configuration \(adapter.rank: 8 in the "
                                         r"workdir, 4 now"):
        train_and_evaluate(other, tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_corrupt_checkpoint_falls_back_to_an_older_one(tmp_path, capsys):
    cfg = _lora_tiny(checkpoint_every=2, keep_checkpoints=3)
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
    train_and_evaluate(short, tmp_path)
    newest = tmp_path / "checkpoints" / "4"
    for f in newest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    (tmp_path / "summary.json").unlink()
    trainer.train_and_evaluate(short, tmp_path)
    assert "checkpoint 4" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "2").exists()


def test_config_arg_typo_is_an_error():
    with pytest.raises(ValueError, match="expected key=value with key in"):
        load_config("lora", "rnak=4")
    with pytest.raises(KeyError, match="no such field"):
        common.apply_overrides(load_config("lora"), {"adapter.rnak": 4})


def test_lora_plus_is_clipped_once_over_every_trainable_leaf():
    """LoRA+ puts B in its own optimizer group; the gradient clip must still be one global norm
    over A and B together (clipping inside each group would clip them separately)."""
    cfg = _lora_tiny()
    cfg = dataclasses.replace(cfg, method_args={**cfg.method_args, "lora_plus_ratio": 4.0},
                              optim=dataclasses.replace(cfg.optim, grad_clip=1e-3, name="sgd",
                                                        b1=0.0, warmup_steps=0,
                                                        schedule="constant"))
    tok = trainer.D.get_tokenizer("byte")
    model, _, _ = trainer.build_model(cfg.model, tok.vocab_size)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = trainer.base_params(cfg, model, None, example)
    setup = trainer.make_setup(cfg, model, params, example)
    grads = jax.tree.map(jnp.ones_like, setup.trainable)
    _, state = setup.tx.update(grads, setup.tx.init(setup.trainable), setup.trainable)
    updates, _ = setup.tx.update(grads, state, setup.trainable)  # past the 1-step warm-up
    norm = float(optax.global_norm(grads))
    for (path, g), u in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(updates)):
        ratio = 4.0 if path[-1].key == "b" else 1.0
        np.testing.assert_allclose(u, -cfg.optim.lr * ratio * g * 1e-3 / norm, rtol=1e-5)


def test_eval_by_greedy_decoding_beside_teacher_forcing(tmp_path):
    """train.eval_generate: the final exact match is also computed by real greedy decoding; on
    the task suite (answers fully determined by their prefix) both agree example by example."""
    cfg = _lora_tiny()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_generate=True))
    summary = train_and_evaluate(cfg, tmp_path)
    assert summary["accuracy_generated"] == summary["accuracy"]


def test_cached_base_is_read_into_its_shards_and_never_whole(tmp_path, monkeypatch):
    """On 8 devices under ``fsdp`` a cached pretrained base goes from disk straight into its
    shards (``io.load_params(like=)``): orbax reads every leaf shard by shard, never a whole leaf
    on the host, both right after the pretraining and from the cache; values equal the whole read."""
    from orbax.checkpoint import type_handlers
    from orbax.checkpoint._src.serialization import serialization

    from lora_jax import io, sharding
    from lora_jax.train.config import MeshConfig
    from tests.train.test_base_lock import tiny_pretrain_config

    cfg = dataclasses.replace(tiny_pretrain_config(tmp_path), mesh=MeshConfig(preset="fsdp"))
    model, _, _ = trainer.build_model(cfg.model, 320)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    mesh = sharding.make_mesh(cfg.mesh)
    pretrained = trainer.base_params(  # an init on the mesh: the shardings a cached base gets
        dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, source="init")), model, None,
        example, mesh=mesh)
    monkeypatch.setattr(trainer, "train_and_evaluate",  # the pretraining's export, as it writes it
                        lambda pre, workdir: io.save_params(workdir / "params", pretrained) or {})
    reads, read_shard = [], serialization._read_shard

    async def spy(t, **kwargs):  # records (the leaf's shape, the block read onto the host)
        reads.append((tuple(t.shape), tuple(kwargs["restricted_domain"].shape)))
        return await read_shard(t, **kwargs)

    def whole(*_, **__):
        raise AssertionError("the cached base was read whole onto the host")

    with monkeypatch.context() as m:
        m.setattr(serialization, "_read_shard", spy)
        m.setattr(type_handlers.NumpyHandler, "deserialize", whole)
        params = [trainer.base_params(cfg, model, None, example, mesh=mesh) for _ in range(2)]
    assert {leaf for leaf, _ in reads} == {x.shape for x in jax.tree.leaves(pretrained)}
    assert all(block != leaf for leaf, block in reads), reads  # shard by shard, none whole
    want = io.load_params(next(tmp_path.glob("base-*")) / "params")  # the host read
    for got in params:  # after the pretraining, then from the cache
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y, p in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                           jax.tree.leaves(pretrained)):
            assert x.sharding == p.sharding
            np.testing.assert_array_equal(x, y)


def test_a_bert_checkpoint_is_read_into_its_shards_by_the_trainer(tmp_path):
    """``build_model(weights=False)`` reads a BERT checkpoint's config.json alone; ``base_params``
    on 8 devices under ``fsdp`` reads its tensors straight into their shards, with the config's
    head (a fresh classifier), equal to the whole load."""
    from lora_jax import sharding
    from lora_jax.train.config import MeshConfig
    from tests.models.test_bert import HF, hf_weights, write_checkpoint

    cfg = from_dict(Experiment, load_config("bert_lora").to_dict())
    cfg = dataclasses.replace(
        cfg, mesh=MeshConfig(preset="fsdp"), base=dataclasses.replace(cfg.base, source="hf"),
        model=dataclasses.replace(cfg.model, hf_path=write_checkpoint(tmp_path, hf_weights(HF))))
    model, _, hf_params = trainer.build_model(cfg.model, HF["vocab_size"], weights=False)
    assert hf_params is None and model.cfg.head == "sequence"
    params = trainer.base_params(cfg, model, None, jnp.zeros((1, 8), jnp.int32),
                                 mesh=sharding.make_mesh(cfg.mesh))
    _, _, want = trainer.build_model(cfg.model, HF["vocab_size"])  # read whole
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for kp, x in jax.tree_util.tree_leaves_with_path(params):
        if jax.tree_util.keystr(kp) != "['classifier']['bias']":  # (n_labels,): no logical axis
            assert max(s.data.size for s in x.addressable_shards) < x.size, kp
    jax.tree.map(np.testing.assert_array_equal, params, want)
