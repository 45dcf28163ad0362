"""VeRA on the default experiment (see configs/lora.py): frozen random projections shared by the
layers of each shape, trained scaling vectors d (rank) and b (output features).

    python -m experiments.train --config=configs/vera.py --workdir=runs/vera
    python -m experiments.train --config=configs/vera.py:rank=128 --workdir=runs/vera_r128

Arg keys: those of configs/lora.py (alpha has no effect: VeRA has no scale, as in PEFT). VeRA
trains r + d_out numbers per layer, so it wants a much larger rank than LoRA (PEFT's default is
256) and a larger learning rate; the default here is rank 64, lr 1e-2.
"""

from configs import common, lora


def get_config(arg: str = ""):
    config = lora.get_config(arg)
    if "rank=" not in (arg or ""):
        config.adapter.rank = 64
    config.optim.lr = 1e-2
    return common.set_method(config, "vera")


def get_sweep(arg: str = ""):
    """VeRA across ranks: 'full' {16, 64, 256}; 'small' {16, 64}."""
    size, _ = common.split_size(arg)
    return [{"adapter.rank": r} for r in ((16, 64) if size == "small" else (16, 64, 256))]
