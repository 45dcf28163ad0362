"""The "write your own method" example of docs/design.md, run as a user would: its code block is
written to a config file outside the package and trained with ``experiments.train``; then the
conformance checks run on the method it registered."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config.base.source=init",
        "--config.model.overrides=d_model=32,n_layers=2,n_head=2,n_positions=32,vocab_size=320",
        "--config.data.n_train_per_task=16", "--config.data.n_eval_per_task=8",
        "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.train.eval_batch_size=16"]


def example_code() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    block = re.search(r"<!-- example: gated_lora.py -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/design.md lost its example"
    return block.group(1)


def test_the_example_is_about_40_lines():
    assert len(example_code().splitlines()) <= 60


@pytest.mark.slow
def test_the_design_doc_example_trains_with_experiments_train(tmp_path):
    config = tmp_path / "gated_lora.py"
    config.write_text(example_code())
    out = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={config}",
                          f"--workdir={tmp_path / 'run'}", *TINY], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "gated_lora" in out.stdout and "step 3/3" in out.stdout
    assert (tmp_path / "run" / "summary.json").exists()
    spec = (tmp_path / "run" / "adapter" / "spec.json").read_text()
    assert '"gated_lora"' in spec and '"gate_decay"' in spec


def test_the_example_method_conforms():
    import lora_jax as lj
    from tests.methods import test_conformance as suite

    namespace = {"__name__": "gated_lora_example"}
    exec(compile(example_code(), "gated_lora.py", "exec"), namespace)
    try:
        suite.test_identity_factored_merged_unmerged("gated_lora", False)
        suite.test_identity_factored_merged_unmerged("gated_lora", True)
    finally:
        del lj.methods._REGISTRY["gated_lora"]
