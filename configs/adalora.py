"""AdaLoRA on the default experiment (see configs/lora.py): rank 12 per layer at first, pruned by
importance to a mean rank of 8 (LoRA r=8's total), PEFT's defaults scaled to the run's length.

    python -m experiments.train --config=configs/adalora.py --workdir=runs/adalora
    python -m experiments.train --config=configs/adalora.py:small --workdir=runs/adalora_small

Arg keys: those of configs/lora.py (``rank`` is the initial rank) plus ``target`` (the final mean
rank). The schedule is built for ``steps``: change the run's length with the ``steps=`` arg, not
``--config.train.steps`` (or set ``--config.method_args.total_step`` too). Warm-up ``tinit`` is
10% of the steps, the final phase ``tfinal`` 20%, reallocation every 2.5%.
"""

from configs import common, lora


def get_config(arg: str = ""):
    size, rest = common.split_size(arg)
    items = [i for i in rest.split(",") if i.strip()]
    target = [i for i in items if i.strip().startswith("target=")]
    rest = ",".join(i for i in items if i not in target)
    if "rank=" not in rest:
        rest = ",".join(filter(None, [rest, "rank=12"]))
    config = lora.get_config(",".join(filter(None, [size if arg.startswith(size) else "", rest])))
    steps = config.train.steps
    return common.set_method(
        config, "adalora", target_rank=int(target[0].split("=")[1]) if target else 8,
        total_step=steps, tinit=steps // 10, tfinal=steps // 5, delta_t=max(1, steps // 40))


def get_sweep(arg: str = ""):
    """AdaLoRA to final mean ranks {2, 8} from 1.5x that rank."""
    del arg
    return [{"adapter.rank": 3, "method_args.target_rank": 2},
            {"adapter.rank": 12, "method_args.target_rank": 8}]
