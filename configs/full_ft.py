"""Full fine-tuning on the default experiment: the baseline LoRA is compared against.

    python -m experiments.train --config=configs/full_ft.py --workdir=runs/full_ft
"""

from configs import common


def get_config(arg: str = ""):
    size, arg = common.split_size(arg)  # 'small': common.SMALL_STEPS steps, as in configs/lora.py
    a = common.parse_arg(arg, steps=common.SMALL_STEPS if size == "small" else 400, lr=1e-3)
    config = common.get_config()
    config.method = "full"
    config.optim.lr = a["lr"]
    config.train.steps = a["steps"]
    return common.apply_size(config, size)


def get_sweep(arg: str = ""):
    """Learning rate: 'full' {3e-4, 1e-3, 3e-3}; 'small' {1e-3, 3e-3}."""
    size, _ = common.split_size(arg)
    return [{"optim.lr": lr} for lr in ((1e-3, 3e-3) if size == "small" else (3e-4, 1e-3, 3e-3))]
