"""rsLoRA: the adapter scale α/√r instead of α/r, on the default experiment (configs/lora.py).

    python -m experiments.train --config=configs/rslora.py:rank=64 --workdir=runs/rslora_r64
    python -m experiments.sweep --config=configs/rslora.py:small --workdir=runs/rslora --batched
    python -m experiments.sweep --config=configs/rslora.py:wide --workdir=runs/rslora_wide --batched
    python -m experiments.report runs/rslora

rsLoRA's claim (Kalajdzievski, 2023): with α/r the update shrinks as the rank grows, so higher
ranks learn no better; with α/√r they keep improving. The sweep puts both scalings at the same ranks
(α fixed at 16); at rank 1 they coincide ('full' includes it as a check).
A leading 'wide' (to both functions) is the 'small' run on a wider, shallower model
(``WIDE_MODEL``: d_model 256, 2 layers, its own cached base), where rank 256 is the full rank of
the square kernels; its sweep takes the ranks ``WIDE_RANKS``.
Results: docs/ablations.md.
"""

from configs import common, lora

WIDE_MODEL = "d_model=256,n_layers=2"
WIDE_RANKS = (4, 16, 64, 256)


def _split_wide(arg: str) -> tuple[bool, str]:
    """``'wide,rank=8'`` -> ``(True, 'small,rank=8')``; any other arg is returned as it is."""
    head, _, rest = (arg or "").partition(",")
    if head.strip() == "wide":
        return True, "small," + rest
    return False, arg or ""


def get_config(arg: str = ""):
    wide, arg = _split_wide(arg)
    config = lora.get_config(arg)
    if "rslora=" not in arg:  # on by default here; 'rslora=False' still selects α/r
        config.adapter.rslora = True
    if wide:
        config.model.overrides = WIDE_MODEL
    return config


def get_sweep(arg: str = ""):
    """α/r vs α/√r: 'full' ranks {1, 2, 4, 8, 16, 32, 64, 128} (16 runs); 'small' {4, 16, 64} and
    'wide' ``WIDE_RANKS``, each × the seeds ``common.SEEDS`` (18 and 24 runs)."""
    wide, arg = _split_wide(arg)
    size, _ = common.split_size(arg)
    ranks = (WIDE_RANKS if wide else (4, 16, 64) if size == "small"
             else (1, 2, 4, 8, 16, 32, 64, 128))
    return common.over_seeds([{"adapter.rslora": rs, "adapter.rank": r}
                              for rs in (False, True) for r in ranks], size)
