"""DoRA on the default experiment (see configs/lora.py).

    python -m experiments.train --config=configs/dora.py --workdir=runs/dora
"""

from configs import common, lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config = common.set_method(config, "dora")
    return config


def get_sweep(arg: str = ""):
    """DoRA across ranks: 'full' {2, 8, 32}; 'small' {2, 8} (``common.SMALL_STEPS`` steps each)."""
    size, _ = common.split_size(arg)
    return [{"adapter.rank": r} for r in ((2, 8) if size == "small" else (2, 8, 32))]
