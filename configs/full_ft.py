"""Full fine-tuning on the default experiment: the baseline LoRA is compared against.

    python -m experiments.train --config=configs/full_ft.py --workdir=runs/full_ft

What it reaches (2-core CPU, seed 0, same cached base and 400 steps as configs/lora.py): all
875,264 parameters trained; digits_reverse 0.973, kv_recall 0.418, mean 0.695 (LoRA r=8
all-linear with 7% of the trainable parameters: 0.867 / 0.367 / 0.617); eval loss 4.82 -> 0.19.
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
