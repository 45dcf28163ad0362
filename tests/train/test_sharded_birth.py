"""The trainer's base is born in its shards (issue 13): on 8 devices under ``fsdp``, after
``trainer.prepare`` no array of the base is whole on one device and no second copy of it is
alive, for an initialised base and a Hugging Face one (read by ``hf_sharded``); and 2 processes
loading a sharded safetensors checkpoint each peak at about their own shards plus one tensor."""

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from lora_jax.train import Experiment, from_dict, trainer
from lora_jax.train.config import MeshConfig
from tests.models.test_hf import GPT2_HF, gpt2_weights, write_checkpoint
from tests.procs import child_env
from tests.test_multihost import _free_port
from tests.train.test_trainer import load_config, tiny

ROOT = Path(__file__).resolve().parents[2]
# What else a load leaves resident (allocator arenas, code first run); measured 11-14 MB.
SLACK = 32 * 2**20


def _cfg(source: str, tmp_path) -> Experiment:
    cfg = tiny(from_dict(Experiment, load_config("lora").to_dict()), steps=1)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(preset="fsdp"),
                              base=dataclasses.replace(cfg.base, source=source))
    if source == "hf":
        hf_config = dict(GPT2_HF, vocab_size=320, n_positions=32)
        path = write_checkpoint(tmp_path / "hf", hf_config, gpt2_weights(hf_config))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_path=path))
    return cfg


@pytest.mark.parametrize("source", ["init", "hf"])
def test_no_base_array_is_whole_on_one_device_after_setup(source, tmp_path):
    cfg = _cfg(source, tmp_path)
    before = {id(x) for x in jax.live_arrays()}
    model, _, hf_params = trainer.build_model(cfg.model, 320, weights=False)
    assert hf_params is None  # a GPT-2 checkpoint is not read whole
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    setup, sh = trainer.prepare(cfg, model, hf_params, example)
    base = jax.tree.leaves(setup.frozen["params"])
    shapes = Counter(x.shape for x in base)
    new = [x for x in jax.live_arrays() if id(x) not in before and x.shape in shapes]
    # Exactly the base's arrays carry its shapes (no whole copy left behind), each one split.
    assert Counter(x.shape for x in new) == shapes
    for x in new:
        assert max(s.data.size for s in x.addressable_shards) < x.size, x.shape
    assert all(x.sharding == s for x, s in zip(base, jax.tree.leaves(sh.frozen["params"])))


@pytest.mark.slow
def test_two_processes_load_a_checkpoint_each_within_its_shards_and_one_tensor(tmp_path):
    """Each process's peak resident memory grows by at most its shards + one tensor (+ slack)
    while ``load_hf_sharded`` reads a 202 MB GPT-2 checkpoint (4 MB tensors at most) over 2
    processes x 2 devices under ``fsdp``: about 105 MB each, where reading the whole model would
    cost each process over 202 MB."""
    config = dict(GPT2_HF, vocab_size=320, n_positions=32, n_embd=512, n_layer=16, n_head=8)
    path = write_checkpoint(tmp_path / "hf", config, gpt2_weights(config))
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.train.hf_load_child", path, address,
                               str(i)], cwd=ROOT, env=child_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for out in outs:
        r = json.loads(out.strip().splitlines()[-1])
        print(r)  # the figures in docs/scaling.md (pytest -s)
        assert r["local_bytes"] < 0.6 * r["total_bytes"]  # its half (plus the replicated rest)
        assert r["peak_growth"] < r["local_bytes"] + r["largest_tensor"] + SLACK, r
        assert r["put_ok"]
