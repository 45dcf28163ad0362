"""LoRA-FA on the default experiment (see configs/lora.py): A frozen at its init, only B trained.

    python -m experiments.train --config=configs/lora_fa.py --workdir=runs/lora_fa

Arg keys: those of configs/lora.py. Peak memory against LoRA: ``experiments/bench_lora_fa.py``.
"""

from configs import common, lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    init = config.method_args.init_weights
    return common.set_method(config, "lora_fa", init_weights=init)


def get_sweep(arg: str = ""):
    """LoRA-FA across ranks: 'full' {2, 8, 32}; 'small' {2, 8}."""
    size, _ = common.split_size(arg)
    return [{"adapter.rank": r} for r in ((2, 8) if size == "small" else (2, 8, 32))]
