"""The README's "Shard your own model" block runs as written on the 8 simulated devices."""

import re
import warnings
from pathlib import Path

import jax
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipe() -> str:
    text = README.read_text()
    section = text.split("## Shard your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_shard_recipe_runs_sharded():
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every parameter is named: none replicated
        exec(compile(_recipe(), "README.md#shard-your-own-model", "exec"), scope)  # noqa: S102
    assert np.isfinite(float(scope["metrics"]["loss"]))
    kernel = scope["frozen"]["params"]["up"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp" and kernel.addressable_shards[0].data.shape == (8, 256)
    for leaf in jax.tree.leaves(scope["trainable"]):
        assert not leaf.sharding.is_fully_replicated, leaf.shape
