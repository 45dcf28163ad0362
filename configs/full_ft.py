"""Full fine-tuning on the default experiment: the baseline LoRA is compared against.

    python -m experiments.train --config=configs/full_ft.py --workdir=runs/full_ft
"""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, steps=400, lr=1e-3)
    config = common.get_config()
    config.method = "full"
    config.optim.lr = a["lr"]
    config.train.steps = a["steps"]
    return config


def get_sweep(arg: str = ""):
    del arg
    return [{"optim.lr": lr} for lr in (3e-4, 1e-3, 3e-3)]
