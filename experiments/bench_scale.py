"""Per-device memory of the large configs' train step on 256 simulated devices (docs/scaling.md).

    python experiments/bench_scale.py [llama2_7b llama_70b]

Each config is lowered and compiled from abstract shapes in a fresh process
(``tests/test_large_configs.py``, which sets ``--xla_force_host_platform_device_count=256``);
prints one JSON line per config: arguments, outputs, temp (XLA:CPU's buffer assignment), XLA:CPU's
f32 copies of bf16 kernels (a CPU artefact), and the compiling process's peak resident memory.
7B takes ~1 minute, 70B ~2.5 minutes on a loaded 2-core machine.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_large_configs import _run  # noqa: E402

MB = 1e6

if __name__ == "__main__":
    for name in sys.argv[1:] or ["llama2_7b", "llama_70b"]:
        got = _run(name)
        print(json.dumps({"config": name, **got}))
        print(f"{name}: arguments {got['argument_size_in_bytes'] / MB:.1f} MB/device, temp "
              f"{got['temp_size_in_bytes'] / MB:.0f} MB/device (of which XLA:CPU f32 kernel "
              f"copies in the HLO: {got['cpu_f32_kernel_copies_in_hlo_bytes'] / MB:.0f} MB over "
              f"{got['cpu_f32_kernel_copies_count']} converts), peak host RSS "
              f"{got['peak_host_rss_bytes'] / MB:.0f} MB", file=sys.stderr, flush=True)
