"""bench_peers runs end to end on a tiny model; a missing peer is skipped with its reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_peers_smoke_without_torch(tmp_path):
    out = tmp_path / "peers.json"
    subprocess.run([sys.executable, "-m", "experiments.bench_peers", "--preset=tiny", "--steps=1",
                    "--batch=2", "--seq=16", "--torch_python=/nonexistent/python",
                    f"--out={out}"], cwd=ROOT, check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert "no torch Python" in res["skipped"]["peft"]
    assert "lora_jax" in res["systems"] and res["matmul_gflops"] > 0
    fastest = min(v["ratio_to_fastest"] for v in res["systems"].values())
    assert abs(fastest - 1.0) < 1e-9
    assert {"forward (loss only)", "LM head + CE, fwd + input grad"} <= set(res["summary"])
