"""QLoRA on the default experiment (see configs/lora.py): LoRA over an NF4 (double-quantised) base.

Every linear layer of the base but the tied LM head is stored as NF4 and dequantised inside its
layer on every call; the adapters (all-linear, r=8) train over those dequantised weights.

    python -m experiments.train --config=configs/qlora.py --workdir=runs/qlora
    python -m experiments.train --config=configs/qlora.py:kind=int8 --workdir=runs/qlora_int8

Arg keys: kind ('nf4' | 'int8'), plus configs/lora.py's (rank, alpha, targets, steps, ...).
What it reaches on the default experiment (2-core CPU, seed 0, same cached base, r=8 all-linear,
400 steps, 65,536 trainable of 940,800): base accuracy 0.000 on both held-out tasks, then

    run                                  digits_reverse  kv_recall  mean   eval loss
    LoRA, fp32 base (configs/lora.py)    0.867           0.367      0.617  4.82 -> 0.36
    QLoRA, NF4 base (this config)        0.859           0.379      0.619  4.81 -> 0.356

i.e. NF4 costs nothing measurable here (one seed each; 2 and 3 examples of 256 per task). The log
reports the quantised kernels' bytes: 3.00 -> 0.39 MiB (NF4), base 3.34 -> 0.73 MiB. Memory and
step time on GPT-2-small shapes: BENCHMARKS.md, '## QLoRA'.
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
