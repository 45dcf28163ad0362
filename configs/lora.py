"""LoRA on the default experiment: a tiny GPT-2 pretrained on a task mixture (cached), adapted to
held-out tasks it never saw.

    python -m experiments.train --config=configs/lora.py --workdir=runs/lora
    python -m experiments.train --config=configs/lora.py:rank=4,targets=qv --workdir=runs/lora_r4

Arg keys: rank, alpha, targets ('qv' | 'attn' | 'all-linear' | regexes joined by '+'), steps,
rslora, init. What it reaches on this 2-core CPU: see docs/results.md (default experiment).
"""

from configs import common


def get_config(arg: str = ""):
    a = common.parse_arg(arg, rank=8, alpha=16.0, targets="all-linear", steps=400, rslora=False,
                         init="default")
    config = common.get_config()
    config.method = "lora"
    config.adapter.rank = a["rank"]
    config.adapter.alpha = float(a["alpha"])
    config.adapter.targets = a["targets"]
    config.adapter.rslora = a["rslora"]
    config.adapter.init = a["init"]
    config.train.steps = a["steps"]
    return config


def get_sweep(arg: str = ""):
    """Rank × targets; each dict is a set of dotted overrides."""
    del arg
    return [{"adapter.rank": r, "adapter.targets": t}
            for r in (1, 2, 4, 8, 16, 32, 64) for t in ("qv", "attn", "all-linear")]
