"""DoRA on the default experiment (see configs/lora.py).

    python -m experiments.train --config=configs/dora.py --workdir=runs/dora
"""

from configs import lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    config.method = "dora"
    return config


def get_sweep(arg: str = ""):
    del arg
    return [{"adapter.rank": r} for r in (2, 8, 32)]
