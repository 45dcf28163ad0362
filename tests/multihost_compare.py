"""By hand, not collected by pytest (a 2-process run costs about a minute here): one tiny run in
1 process (8 CPU devices) and in 2 processes (4 each), with the settings of
``tests/test_multihost.py``, must give the same losses and the same parameter exports.

    nice -n 19 python tests/multihost_compare.py OUT losa [--config.mesh.preset=dp ...]
    nice -n 19 python tests/multihost_compare.py OUT full
    nice -n 19 python tests/multihost_compare.py OUT mtl

``losa`` (T = 2, S = 0.5) also compares the summary's sparsities, ranks, errors and layer-wise
sparsities, then resumes the 2-process run from its step-3 checkpoint (after LoSA iteration 1,
before 2) in 2 processes and compares again. Exports are read back with ``lj.io.load_params``
in this (third) process. Extra arguments go to every run (the mesh preset is ``fsdp_tp``
unless overridden). Exits non-zero on any difference; a run that has not finished after
``TIMEOUT`` seconds (300) is killed and reported.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # as tests/conftest.py: cheap compiles

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lora_jax import io  # noqa: E402
from tests import test_multihost as mh  # noqa: E402

METHODS = {
    "losa": ["--config=configs/losa.py", "--config.method_args.iterations=2",
             "--config.method_args.target=0.5", "--config.method_args.calib_samples=16"],
    "full": ["--config=configs/full_ft.py"],
    "mtl": ["--config=configs/mtl_lora.py:method=mtl", "--config.method_args.export_merged=True"],
}
TIMEOUT = int(os.environ.get("TIMEOUT", "300"))


def run(workdir: Path, processes: int) -> None:
    t0 = time.time()
    procs, logs = mh.launch(workdir, processes)
    for p in procs:
        p.join(TIMEOUT)
    hung = [i for i, p in enumerate(procs) if p.exitcode is None]
    for p in procs:
        if p.exitcode is None:
            p.kill()
    print(f"{processes} process(es): {time.time() - t0:.0f} s, exit codes "
          f"{[p.exitcode for p in procs]}, still running at the timeout: {hung}", flush=True)
    if any(p.exitcode != 0 for p in procs):
        for i, log in enumerate(logs):
            print(f"--- process {i} ({log}):\n" + "\n".join(log.read_text().splitlines()[-30:]))
        sys.exit(1)


def max_diff(a: Path, b: Path) -> float:
    x, y = io.load_params(a), io.load_params(b)
    assert jax.tree.structure(x) == jax.tree.structure(y)
    zeros = lambda t: [int(np.sum(v == 0)) for v in jax.tree.leaves(t)]
    assert zeros(x) == zeros(y), "the exports' zero counts differ"
    return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(x),
                                                           jax.tree.leaves(y)))


def compare_exports(one: Path, two: Path, names) -> None:
    for name in names:
        diff = max_diff(one / name, two / name)
        print(f"export {name}: max |1 process - 2 processes| = {diff:.3g}; same zero counts")
        assert diff < 1e-5


def main(out: Path, method: str, extra: list[str]) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mh.ARGS = [METHODS[method][0], *mh.ARGS[1:], *METHODS[method][1:], *extra]
    for n in (1, 2):
        run(out / f"p{n}", n)
    one, two = out / "p1", out / "p2"
    l1, l2 = mh._losses(one), mh._losses(two)
    print("losses, 1 process: ", [round(v, 6) for v in l1.values()])
    print("losses, 2 processes:", [round(v, 6) for v in l2.values()])
    np.testing.assert_allclose([l2[s] for s in l1], list(l1.values()), rtol=mh.RTOL)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    names = {"losa": ["merged"], "full": ["params"]}.get(method) or [
        f"merged/{p.name}" for p in sorted((one / "merged").iterdir())]
    compare_exports(one, two, names)
    if method != "losa":
        print("OK: 2 processes equal 1 process")
        return
    for key in ("sparsity", "base_sparsity"):
        print(f"{key}: {s1[key]} (1 process), {s2[key]} (2 processes)")
        assert s1[key] == s2[key]
    for r1, r2 in zip(s1["losa"], s2["losa"]):
        assert r1["ranks"] == r2["ranks"], (r1["ranks"], r2["ranks"])
        np.testing.assert_allclose(r1["errors"], r2["errors"], rtol=1e-4)
        np.testing.assert_allclose(r1["layer_sparsity"], r2["layer_sparsity"], rtol=1e-6)
        print(f"iteration {r1['iteration']}: ranks {r1['ranks']}, errors {r1['errors']} (1 "
              f"process), {r2['errors']} (2 processes)")
    print("OK: 2 processes equal 1 process")
    resume_losa(out)


def resume_losa(out: Path) -> None:
    """Resumes ``out/p2`` from its step-3 checkpoint and LoSA iteration 1 in 2 processes."""
    one, two, resumed = out / "p1", out / "p2", out / "resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    for log in out.glob("resumed.*.log"):
        log.unlink()
    mh._resume_copy(two, resumed, 3)
    (resumed / "losa").mkdir()
    for name in ("1", "1.json"):  # iteration 2 runs again, at step 4
        copy = shutil.copytree if (two / "losa" / name).is_dir() else shutil.copy
        copy(two / "losa" / name, resumed / "losa" / name)
    run(resumed, 2)
    logs = "".join(p.read_text() for p in out.glob("resumed.*.log"))
    assert logs.count("LoSA: restored iteration 1") == 2, "a process did not restore iteration 1"
    l1, lr = mh._losses(one), mh._losses(resumed)
    print("resumed losses, 2 processes:", [round(v, 6) for v in lr.values()])
    assert sorted(lr) == [4, 5, 6]
    np.testing.assert_allclose([lr[s] for s in lr], [l1[s] for s in lr], rtol=mh.RTOL)
    compare_exports(one, resumed, ["merged"])
    print("OK: the resumed 2-process run equals 1 process")


if __name__ == "__main__":
    main(Path(sys.argv[1]).absolute(), sys.argv[2], sys.argv[3:])
