"""rsLoRA: the adapter scale α/√r instead of α/r, on the default experiment (configs/lora.py).

    python -m experiments.train --config=configs/rslora.py:rank=64 --workdir=runs/rslora_r64
    python -m experiments.sweep --config=configs/rslora.py:small --workdir=runs/rslora
    python -m experiments.report runs/rslora

rsLoRA's claim (Kalajdzievski, 2023): with α/r the update shrinks as the rank grows, so higher
ranks learn no better; with α/√r they keep improving. The sweep puts both scalings at the same ranks
(α fixed at 16); at rank 1 they coincide ('full' includes it as a check).
Results: docs/ablations.md.
"""

from configs import common, lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    if "rslora=" not in (arg or ""):  # on by default here; 'rslora=False' still selects α/r
        config.adapter.rslora = True
    return config


def get_sweep(arg: str = ""):
    """α/r vs α/√r: 'full' ranks {1, 2, 4, 8, 16, 32, 64, 128}; 'small' {4, 16, 64}."""
    size, _ = common.split_size(arg)
    ranks = (4, 16, 64) if size == "small" else (1, 2, 4, 8, 16, 32, 64, 128)
    return [{"adapter.rslora": rs, "adapter.rank": r} for rs in (False, True) for r in ranks]
