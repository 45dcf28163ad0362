"""The README's code runs, and its quick start has exactly two command lines."""

import re
from pathlib import Path

import jax
import numpy as np

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_is_two_command_lines():
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README, re.S).group(1)
    lines = block.strip().splitlines()
    assert len(lines) == 2
    assert "experiments.train" in lines[0] and "pytest" in lines[1]


def test_library_example_runs():
    code = re.search(r"## The library in five calls\n\n```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    params, restored = scope["params"], scope["restored"]
    unboxed = scope["lj"].transform._unbox(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, unboxed)
    assert "trainable params" in scope["lj"].summary(params, scope["adapters"])
