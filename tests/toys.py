"""Small Flax models shared by the tests: a conv net and an ``nn.scan`` stack of multi-axis
DenseGeneral blocks (adapters in the scanned ``'lora'`` collection)."""

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
