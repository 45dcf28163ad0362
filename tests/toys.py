"""Small Flax models shared by the tests: a conv net, an ``nn.scan`` stack of multi-axis
DenseGeneral blocks (adapters in the scanned ``'lora'`` collection), and a model whose Einsum
permutes its output axes."""

import jax.numpy as jnp
from flax import linen as nn


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x)
        return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 8), name="up")(x)
        return x + nn.DenseGeneral(16, axis=(-2, -1), name="down")(jnp.tanh(h)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Block, variable_axes={"params": 0, "lora": 0},
                         split_rngs={"params": True}, length=3)
        x, _ = layers(name="blocks")(x, None)
        return x


class PermutedToy(nn.Module):
    """Embed, multi-axis DenseGeneral (in and out), an Einsum with permuted output, Dense."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 16, name="embed")(ids)
        q = nn.DenseGeneral((2, 4), name="query")(x)
        h = nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.tanh(q))
        h = nn.Einsum((16, 3, 8), "btd,dnh->bnth", name="ein")(h)
        h = jnp.moveaxis(h, 1, 2).reshape(h.shape[0], h.shape[2], 24)
        return nn.Dense(10, name="head")(jnp.tanh(h))
