"""Contract tests shared by GPT-2 and Llama: layouts, scan/remat equivalence, sharding names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import get_model, stack_layers, unstack_layers

FAMILIES = {"gpt2": "h", "llama": "layers"}
SMALL = dict(vocab_size=64, d_model=32, n_layers=2)


def _tokens(batch=2, seq=8, vocab=64, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


def _boxed_shapes(model):
    """`model.init`'s variables as ShapeDtypeStructs, still wrapped in their partitioning boxes."""
    return jax.eval_shape(model.init, jax.random.key(1), _tokens())


def _init(family, **overrides):
    """Random params filled from numpy; compiling `model.init` would dominate these CPU tests."""
    model, cfg = get_model(family, "tiny", **{**SMALL, **overrides})
    shapes = nn.meta.unbox(_boxed_shapes(model))
    rng = np.random.default_rng(0)
    fill = lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
    return model, cfg, jax.tree.map(fill, shapes)


def _apply(model):
    """Jitted `model.apply`: one compile is much faster on CPU than eager op-by-op dispatch."""
    return jax.jit(model.apply, static_argnames="deterministic")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_shape_and_dtype(family):
    model, cfg, variables = _init(family, dtype=jnp.bfloat16)
    logits = _apply(model)(variables, _tokens())
    assert logits.shape == (2, 8, cfg.vocab_size)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(family, scan):
    model, _ = get_model(family, "tiny", **SMALL, scan_layers=scan)
    variables = _boxed_shapes(model)
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == x.value.ndim
    specs = nn.get_partition_spec(variables)["params"]
    layer = FAMILIES[family] if scan else FAMILIES[family] + "_0"
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
    for spec in jax.tree.leaves(specs[layer], is_leaf=is_spec):
        assert (spec[0] == "layers") == scan


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_and_unscanned_logits_match(family):
    prefix = FAMILIES[family]
    model, _, variables = _init(family)
    scanned, _ = get_model(family, "tiny", **SMALL, scan_layers=True)
    params = variables["params"]
    stacked = stack_layers(params, prefix)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
        jnp.shape, nn.meta.unbox(_boxed_shapes(scanned)["params"]))
    tokens = _tokens()
    apply = _apply(model)
    want = apply({"params": params}, tokens)
    np.testing.assert_allclose(_apply(scanned)({"params": stacked}, tokens), want, atol=1e-5)
    round_trip = unstack_layers(stacked, prefix)
    np.testing.assert_array_equal(apply({"params": round_trip}, tokens), want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_remat_matches_plain(family, scan):
    model, _, variables = _init(family, scan_layers=scan)
    remat, _ = get_model(family, "tiny", **SMALL, scan_layers=scan, remat=True)
    params = variables["params"]
    tokens = _tokens()
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)
    v1, g1 = jax.jit(jax.value_and_grad(loss(model)))(params)
    v2, g2 = jax.jit(jax.value_and_grad(loss(remat)))(params)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_causal(family):
    model, _, variables = _init(family)
    tokens = _tokens()
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 64)
    apply = _apply(model)
    a, b = apply(variables, tokens), apply(variables, changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_dropout_uses_dropout_stream(family, scan):
    model, _, variables = _init(family, dropout_rate=0.5, scan_layers=scan)
    tokens = _tokens()
    apply = _apply(model)
    det = apply(variables, tokens)
    np.testing.assert_array_equal(apply(variables, tokens, deterministic=True), det)
    run = lambda seed: apply(variables, tokens, deterministic=False,
                             rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(run(0), det)
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(2), run(2))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_projections_are_interceptable_stock_layers(family, scan):
    """LoRA intercepts stock nn.Dense/DenseGeneral/Embed calls; every kernel must come from one."""
    model, _, variables = _init(family, scan_layers=scan)
    seen = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.Dense, nn.DenseGeneral, nn.Embed)):
            seen.add(context.module.path[-1] if context.module.path else None)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, _tokens())
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    owners = {path[-2].key for path, _ in flat if path[-1].key in ("kernel", "embedding")}
    assert owners <= seen, owners - seen


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_too_long_raises(family):
    model, _, variables = _init(family, **({"n_positions": 8} if family == "gpt2" else
                                           {"max_seq_len": 8}))
    with pytest.raises(ValueError, match="exceeds"):
        model.apply(variables, _tokens(seq=9))


def test_get_model_errors_name_valid_choices():
    with pytest.raises(ValueError, match=r"valid families: \[.*'gpt2'.*'llama'.*\]"):
        get_model("t5")
    with pytest.raises(ValueError, match="valid presets"):
        get_model("gpt2", "huge")
    with pytest.raises(ValueError, match="n_layer"):
        get_model("llama", "tiny", n_layer=3)
