"""LoRA on the default experiment: a tiny GPT-2 pretrained on a task mixture (cached), adapted to
held-out tasks it never saw.

    python -m experiments.train --config=configs/lora.py --workdir=runs/lora
    python -m experiments.train --config=configs/lora.py:rank=4,targets=qv --workdir=runs/lora_r4

Arg keys: rank, alpha, targets ('qv' | 'attn' | 'all-linear' | regexes joined by '+'), steps,
rslora, init. What it reaches (2-core CPU, seed 0): base accuracy 0.000 on both held-out tasks;
after 400 LoRA steps (r=8, all-linear, 65,536 trainable of 940,800) digits_reverse 0.867,
kv_recall 0.367, mean 0.617; eval loss 4.82 -> 0.36. configs/full_ft.py is the comparison.

The arg may start with a sweep size, 'small' or 'full' (the default): 'small' shortens the run to
``common.SMALL_STEPS`` steps (evaluating every 25 for the loss curves) and ``get_sweep('small')``
is a subset of the grid; docs/ablations.md shows what each produced.

    python -m experiments.sweep --config=configs/lora.py:small --workdir=runs/rank_targets
    python -m experiments.report runs/rank_targets
"""

from configs import common


def get_config(arg: str = ""):
    size, arg = common.split_size(arg)
    a = common.parse_arg(arg, rank=8, alpha=16.0, targets="all-linear",
                         steps=common.SMALL_STEPS if size == "small" else 400, rslora=False,
                         init="default")
    config = common.get_config()
    config.method = "lora"
    config.adapter.rank = a["rank"]
    config.adapter.alpha = float(a["alpha"])
    config.adapter.targets = a["targets"]
    config.adapter.rslora = a["rslora"]
    config.method_args.init_weights = a["init"]
    config.train.steps = a["steps"]
    return common.apply_size(config, size)


def get_sweep(arg: str = ""):
    """Rank × targets; each dict is a set of dotted overrides.

    'full': ranks {1, 2, 4, 8, 16, 32, 64} × targets {qv, attn, all-linear} (21 runs of 400 steps).
    'small': ranks {1, 8, 64} × the same targets (9 runs of ``common.SMALL_STEPS``).
    """
    size, _ = common.split_size(arg)
    ranks = (1, 8, 64) if size == "small" else (1, 2, 4, 8, 16, 32, 64)
    return [{"adapter.rank": r, "adapter.targets": t}
            for t in ("qv", "attn", "all-linear") for r in ranks]
