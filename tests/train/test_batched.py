"""Batched sweeps (lora_jax/train/batched.py): a group's per-point losses equal the solo runs' (on
one device and on an 8-device mesh, adapter dropout included), the workdirs hold what solo runs
write, grouping says why a point trains solo, a diverged point stops alone, an interrupted group
resumes exactly."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import data as D
from lora_jax import rules, sharding
from lora_jax.train import Experiment, train_and_evaluate
from lora_jax.train import batched, trainer
from lora_jax.train.config import AdapterConfig, MeshConfig, OptimConfig
from tests.train.test_trainer import tiny

# 4 points differing in rank, alpha/rsLoRA, adapter dropout, learning rate, schedule and seed.
POINTS = [dict(rank=2, lr=3e-3, seed=0), dict(rank=8, lr=1e-2, seed=1, dropout=0.2),
          dict(rank=4, lr=1e-3, seed=2, rslora=True), dict(rank=8, lr=3e-3, seed=0, wd=0.1)]


def point(rank, lr, seed, rslora=False, wd=0.0, steps=4, dropout=0.0, warmup=2,
          mesh=MeshConfig(), model_dropout=0.0) -> Experiment:
    cfg = tiny(Experiment(), steps=steps)
    extra = ",n_layers=1" + (f",dropout_rate={model_dropout}" if model_dropout else "")
    model = dataclasses.replace(cfg.model, overrides=cfg.model.overrides + extra)
    return dataclasses.replace(
        cfg, seed=seed, model=model, mesh=mesh,
        adapter=AdapterConfig(rank=rank, alpha=2.0 * rank, targets="qv", rslora=rslora,
                              dropout=dropout),
        optim=OptimConfig(lr=lr, weight_decay=wd, warmup_steps=warmup),
        train=dataclasses.replace(cfg.train, log_every=1, eval_every=2 if steps > 3 else 1000))


def records(workdir, split):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.slow  # 4 solo runs + the group: ~50 s on 2 loaded cores (compilation)
def test_group_losses_equal_solo_runs_and_resume_exactly(tmp_path, monkeypatch):
    """On 8 devices with fsdp (the adapters sharded over the data-parallel axis): the group is
    interrupted (SIGTERM's flag) before step 3 and resumed from its checkpoint."""
    cfgs = [point(**p, mesh=MeshConfig(preset="fsdp")) for p in POINTS]
    groups, solo = batched.plan_groups(cfgs)
    assert groups == [[0, 1, 2, 3]] and solo == {}
    dirs = [tmp_path / f"b{i}" for i in range(4)]
    with monkeypatch.context() as m:
        m.setattr(trainer.PREEMPTION, "should_stop", lambda step: step == 3)
        assert batched.train_group(cfgs, dirs) == [{"interrupted": True, "step": 2}] * 4
    assert all((d / "checkpoints").is_dir() and not (d / "summary.json").exists() for d in dirs)
    logs = []
    out = batched.train_group(cfgs, dirs, log=logs.append)
    assert "batched group: resuming from step 2" in logs
    for i, cfg in enumerate(cfgs):
        ref = train_and_evaluate(cfg, tmp_path / f"s{i}")
        b, s = tmp_path / f"b{i}", tmp_path / f"s{i}"
        tb, ts = records(b, "train"), records(s, "train")
        assert [r["step"] for r in tb] == [r["step"] for r in ts] == [1, 2, 3, 4]
        np.testing.assert_allclose([r["loss"] for r in tb], [r["loss"] for r in ts], rtol=0,
                                   atol=1e-5, err_msg=f"point {i}")
        np.testing.assert_allclose([r["lr"] for r in tb], [r["lr"] for r in ts], rtol=1e-7)
        eb, es = records(b, "eval"), records(s, "eval")
        assert [r["step"] for r in eb] == [r["step"] for r in es] == [0, 2, 4]
        np.testing.assert_allclose([r["loss"] for r in eb], [r["loss"] for r in es], atol=1e-5)
        assert out[i]["final_train_loss"] == pytest.approx(ref["final_train_loss"], abs=1e-5)
        assert out[i]["trainable_params"] == ref["trainable_params"]
        assert set(ref) <= set(out[i])
        for name in ("run.json", "base_eval.json", "adapter", "summary.json"):
            assert (b / name).exists(), name
        assert json.loads((b / "run.json").read_text())["adapter"] == \
            json.loads((s / "run.json").read_text())["adapter"]
    # the points really differ, so equality above is not trivial
    assert len({round(o["final_train_loss"], 6) for o in out}) == 4


def test_plan_groups_says_why_points_train_solo(monkeypatch):
    base = point(rank=4, lr=1e-3, seed=0)
    cfgs = [base, dataclasses.replace(base, seed=1),
            dataclasses.replace(base, method="dora"),
            dataclasses.replace(base, adapter=dataclasses.replace(base.adapter, targets="all-linear")),
            dataclasses.replace(base, method_args={"init_weights": "pissa"}),
            dataclasses.replace(base, adapter=dataclasses.replace(base.adapter, dropout=0.1)),
            dataclasses.replace(base, data=dataclasses.replace(base.data, kind="images")),
            point(rank=4, lr=1e-3, seed=0, model_dropout=0.1)]
    groups, solo = batched.plan_groups(cfgs)
    assert groups == [[0, 1, 5]]  # adapter dropout is per point; model dropout is shared
    assert "no other point shares" in solo[7]
    assert "method 'dora'" in solo[2] and "no other point shares" in solo[3]
    assert "PiSSA" in solo[4] and "token loss" in solo[6]
    with pytest.raises(ValueError, match="adapter.targets"):
        batched.train_group([cfgs[0], cfgs[3]], ["a", "b"])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="one process"):
        batched.train_group(cfgs[:2], ["a", "b"])


def test_diverged_point_stops_alone(tmp_path):
    cfgs = [point(rank=4, lr=1e-3, seed=0, steps=3), point(rank=4, lr=float("nan"), seed=1, steps=3)]
    out = batched.train_group(cfgs, [tmp_path / "ok", tmp_path / "nan"])
    assert out[1]["diverged"] and "step 1" in out[1]["reason"]
    assert (tmp_path / "nan" / "diverged.json").exists()
    assert not (tmp_path / "nan" / "summary.json").exists()
    assert np.isfinite(out[0]["final_train_loss"]) and out[0]["steps"] == 3


def _solo_and_group(cfgs, steps):
    """``steps`` steps of each point's solo step (the trainer's placement, step and dropout keys)
    and of the group step, on the points' shared mesh: (solo losses, group losses (steps, K),
    solo trees, group trees, group shardings, the group's trees before training)."""
    tok = D.get_tokenizer(cfgs[0].data.tokenizer)
    model, _, _ = trainer.build_model(cfgs[0].model, tok.vocab_size)
    train, _, _ = trainer.load_data(cfgs[0].data, tok)
    example = jnp.zeros((1, cfgs[0].data.seq_len), jnp.int32)
    params = trainer.base_params(cfgs[0], model, None, example)
    setups = [trainer.adapter_setup(c, model, params, example) for c in cfgs]
    sh = batched.group_shardings(cfgs, model, example, setups)
    loaders = [D.ArrayLoader(train, c.train.batch_size, seed=c.seed) for c in cfgs]
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # put aliases a replicated array's buffer
    place = lambda s, p: (sharding.put(copy(s.trainable), p.trainable),
                          sharding.put(copy(s.frozen), p.frozen))
    solo_losses, solo_trees = [], []
    for cfg, setup, p, loader in zip(cfgs, setups, sh.points, loaders):
        step_fn, _ = trainer.make_steps(setup, p)
        t, f = place(setup, p)
        o = jax.jit(setup.tx.init, out_shardings=p.opt_state)(t)
        losses = []
        for i in range(1, steps + 1):
            rng = jax.random.fold_in(jax.random.key(cfg.seed + 2), i)
            t, o, out = step_fn(t, o, f, sharding.shard_batch(loader.batch(i - 1), p.mesh), rng)
            losses.append(float(out["loss"]))
        solo_losses.append(losses)
        solo_trees.append(t)
    t = tuple(place(s, p)[0] for s, p in zip(setups, sh.points))
    states = tuple(place(s, p)[1]["state"] for s, p in zip(setups, sh.points))
    start = jax.tree.map(np.asarray, t)
    o = tuple(jax.jit(s.tx.init, out_shardings=p.opt_state)(x)
              for s, p, x in zip(setups, sh.points, t))
    group_step = batched.make_group_step(model, cfgs, setups, sh)
    params = sharding.put(params, sh.points[0].frozen["params"])
    group_losses = []
    for i in range(1, steps + 1):
        batch = {k: np.stack([ld.batch(i - 1)[k] for ld in loaders]) for k in ("inputs", "targets",
                                                                          "loss_mask", "task_ids")}
        t, o, out = group_step(t, o, params, states, jax.device_put(batch, sh.batch), np.int32(i))
        group_losses.append(np.asarray(out["loss"]))
    assert group_step._cache_size() == 1
    return np.array(solo_losses).T, np.array(group_losses), solo_trees, (t, o, states), sh, start


def test_group_on_8_device_mesh_equals_solo_runs_with_their_dropout():
    """fsdp_tp on 8 devices (fsdp 4 x tensor 2); three points differing in rank, lr, seed and
    adapter dropout (0, 0.1, 0.3): each point's losses and trained adapters equal its solo step's
    on the same mesh with its solo dropout keys, its trees and optimizer state are placed as its
    solo run's, and the bank is sharded like single adapters (a slot axis, unsharded, added)."""
    mesh = MeshConfig(preset="fsdp_tp")
    cfgs = [point(rank=2, lr=3e-2, seed=0, warmup=0, mesh=mesh),
            point(rank=4, lr=1e-1, seed=1, dropout=0.1, warmup=0, mesh=mesh),
            point(rank=4, lr=3e-2, seed=2, dropout=0.3, warmup=0, mesh=mesh)]
    assert batched.plan_groups(cfgs) == ([[0, 1, 2]], {})
    solo, group, solo_trees, (t, o, states), sh, start = _solo_and_group(cfgs, steps=3)
    assert dict(sh.mesh.shape) == {"data": 1, "fsdp": 4, "fsdp2": 1, "tensor": 2}
    np.testing.assert_allclose(group, solo, rtol=0, atol=1e-5)
    for i in range(3):
        for g, s, s0 in zip(jax.tree.leaves(t[i]), jax.tree.leaves(solo_trees[i]),
                            jax.tree.leaves(start[i])):
            np.testing.assert_allclose(g, s, rtol=0, atol=1e-5, err_msg=f"point {i}")
            assert np.abs(np.asarray(s) - s0).max() > 1e-3  # the adapters did train
    same = lambda x, s: x.sharding.is_equivalent_to(s, x.ndim)
    for i, p in enumerate(sh.points):
        assert all(jax.tree.leaves(jax.tree.map(same, t[i], p.trainable))), i
        assert all(jax.tree.leaves(jax.tree.map(same, o[i], p.opt_state))), i
    # the bank, as the step builds it: each slot axis unsharded, the rest as a single adapter's
    bank = jax.jit(lambda t, s: batched.make_bank(t, s, [1.0] * 3, sh.bank))(t, states)
    single = rules.flatten(sh.points[1].trainable)
    sharded = 0
    for path, node in rules.flatten(bank).items():
        n = node.layout.n_stack
        for leaf in ("a", "b"):
            spec = tuple(single[path].params[leaf].spec)
            spec += (None,) * (node.params[leaf].ndim - 1 - len(spec))
            want = NamedSharding(sh.mesh, P(*spec[:n], None, *spec[n:]))
            assert same(node.params[leaf], want), (path, leaf, node.params[leaf].sharding, want)
            sharded += any(spec)
    assert sharded  # the check is not between replicated arrays


def test_dropout_is_what_the_solo_runs_draw():
    """Adapter dropout 0.3 and model dropout 0.2 (GPT-2's attention and residual dropout, shared
    by the group): each point's losses and adapters equal its solo run's, so both dropout streams
    are the solo runs'. With the adapter dropout set to 0 the first loss is unchanged (B = 0: the
    adapters add nothing yet) but the trained adapters move away from the solo runs' (so the
    equality is no accident); model dropout moves the first loss itself by ~4e-3."""
    cfgs = [point(rank=4, lr=1e-1, seed=s, dropout=0.3, warmup=0, model_dropout=0.2)
            for s in (1, 2)]
    assert batched.plan_groups(cfgs) == ([[0, 1]], {})
    solo, group, solo_trees, (t, _, _), _, _ = _solo_and_group(cfgs, steps=2)
    np.testing.assert_allclose(group, solo, rtol=0, atol=1e-5)
    # Adam's first steps at lr 0.1 move a weight by ~lr * sign(gradient), which turns the fp32
    # reduction-order differences between the vmapped and solo programs (seen up to 4e-5 with
    # conftest's compile flags) into weight differences; wrong masks move them by > 1e-3 (below).
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(solo_trees)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    nodrop = [dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, dropout=0.0))
              for c in cfgs]
    _, group0, _, (t0, _, _), _, _ = _solo_and_group(nodrop, steps=2)
    np.testing.assert_allclose(group0[0], solo[0], rtol=0, atol=1e-6)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(t0), jax.tree.leaves(t)))
    assert diff > 1e-3


@pytest.mark.parametrize("toy", ["PermutedToy", "Stack"])
def test_vmapped_slot_routing_equals_each_adapter_alone(toy):
    """The group's routing (the forward vmapped over the points, a scalar bank slot each) on the
    layouts GPT-2's qv does not reach: embedding, multi-axis DenseGeneral, permuted Einsum, and an
    ``nn.scan`` stack; values and gradients equal each adapter alone (ranks 2, 4, 3)."""
    from tests import toys  # noqa: PLC0415

    model = getattr(toys, toy)()
    xs = (jax.random.randint(jax.random.key(3), (3, 4, 5), 0, 50) if toy == "PermutedToy"
          else jax.random.normal(jax.random.key(3), (3, 4, 16)))
    params = lj.transform._unbox(jax.jit(model.init)(jax.random.key(0), xs[0])["params"])
    layouts = lj.trace_layouts(model, params, xs[0])
    trees = []
    for i, rank in enumerate((2, 4, 3)):
        spec = lj.LoraSpec(rank=rank, alpha=3.0, targets=(r".*/(kernel|embedding)",))
        init = lambda k, spec=spec: lj.split(lj.init_adapters(params, spec, k, layouts=layouts))
        t, s = jax.jit(init)(jax.random.key(10 + i))
        noise = lambda x, k=jax.random.key(20 + i): x + 0.3 * jax.random.normal(k, x.shape)
        trees.append((jax.jit(lambda t: jax.tree.map(noise, t))(t), s))
    ts, ss = tuple(t for t, _ in trees), tuple(s for _, s in trees)
    loss = lambda y: jnp.sum(jnp.sin(y))

    def group(ts):
        bank = batched.make_bank(ts, ss, [1.0] * 3)
        ys = jax.vmap(lambda i, x: lj.apply(model, params, bank, x, adapter_ids=i))(
            jnp.arange(3), xs)
        return jnp.stack([loss(y) for y in ys])

    # the gradient of the sum: point i's part equals its alone gradient only if no other
    # point's loss reaches its adapters (and its own loss does, through its own slot)
    values, grads = jax.jit(lambda ts: (group(ts), jax.grad(lambda t: group(t).sum())(ts)))(ts)
    for i, (t, s) in enumerate(trees):
        alone = lambda t, s, x: loss(lj.apply(model, params, lj.join(t, s), x))
        v, g = jax.jit(jax.value_and_grad(alone))(t, s, xs[i])
        np.testing.assert_allclose(values[i], v, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(grads[i]), jax.tree.leaves(g)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    bank = batched.make_bank(ts, ss, [1.0] * 3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):  # a scalar slot has no -1
        jax.eval_shape(lambda b: lj.apply(model, params, b, xs[0], adapter_ids=-1), bank)
