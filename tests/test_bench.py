"""The benchmark runs end to end on a tiny model and reports every mode (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "experiments.bench", "--preset=tiny", "--steps=1",
                    f"--out={out}"], cwd=ROOT, check=True, capture_output=True)
    res = json.loads(out.read_text())
    assert set(res["step_ms"]) == {"full_ft", "lora_factored", "lora_materialised",
                                   "base_inference", "merged_inference", "unmerged_inference"}
    # XLA's memory accounting is deterministic: LoRA holds no base gradients or Adam moments.
    assert res["peak_mib"]["lora_factored"] < res["peak_mib"]["full_ft"]
    assert all(v > 0 for v in res["ratios"].values())
