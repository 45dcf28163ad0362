"""QLoRA on the default experiment (see configs/lora.py): LoRA over an NF4 (double-quantised) base.

Every linear layer of the base but the tied LM head is stored as NF4 and dequantised inside its
layer on every call; the adapters (all-linear, r=8) train over those dequantised weights.

    python -m experiments.train --config=configs/qlora.py --workdir=runs/qlora
    python -m experiments.train --config=configs/qlora.py:kind=int8 --workdir=runs/qlora_int8

Arg keys: kind ('nf4' | 'int8'), plus configs/lora.py's (rank, alpha, targets, steps, ...).
What it reaches on the default experiment (tiny GPT-2 pretrained and cached once, r=8 all-linear,
400 steps; exact-match accuracy and eval loss on the two held-out digit tasks; one run each, same
cached base and seed, measured 2026-11-28 on the busy 2-core CPU):

    run                                     reverse  rotate  mean    eval loss  (base loss)
    LoRA, fp32 base (configs/lora.py)       0.016    0.051   0.033   1.583      (5.217)
    QLoRA, NF4 base (this config)           0.012    0.031   0.021   1.578      (5.199)

Both are far from solving these tasks in 400 steps. NF4 costs no eval loss here; the accuracy gap
is 1 and 5 of 256 examples per task, from one seed each (no estimate of seed noise yet).
"""

from configs import common, lora


def get_config(arg: str = ""):
    items = [s for s in (arg or "").split(",") if s.strip()]
    kind = "nf4"
    for item in [s for s in items if s.strip().startswith("kind=")]:
        kind = item.partition("=")[2].strip()
        items.remove(item)
    if kind not in ("nf4", "int8"):
        raise ValueError(f"config arg kind={kind!r}: use 'nf4' or 'int8'")
    config = lora.get_config(",".join(items))
    config.quant.kind = kind
    config.quant.targets = "all-linear"
    return config


def get_sweep(arg: str = ""):
    """Storage × rank: 'full' {nf4, int8} × ranks {8, 64}; 'small' {nf4, int8} at rank 8."""
    size, _ = common.split_size(arg)
    ranks = (8,) if size == "small" else (8, 64)
    return [{"quant.kind": k, "adapter.rank": r} for k in ("nf4", "int8") for r in ranks]
