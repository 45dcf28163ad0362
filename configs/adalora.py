"""AdaLoRA on the default experiment (see configs/lora.py): rank 12 per layer at first, pruned by
importance to a mean rank of 8 (LoRA r=8's total), PEFT's defaults scaled to the run's length.

    python -m experiments.train --config=configs/adalora.py --workdir=runs/adalora
    python -m experiments.train --config=configs/adalora.py:small --workdir=runs/adalora_small
    python -m experiments.sweep --config=configs/adalora.py:small --workdir=runs/adalora_seeds

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
    """'full': AdaLoRA to final mean ranks {2, 8} from 1.5x that rank. 'small': the rows of
    docs/ablations.md's AdaLoRA table (lr 3e-3, lr 1e-2, orthogonality weight 0.1 instead of 0.5)
    × the seeds ``common.SEEDS`` (9 runs of ``common.SMALL_STEPS``; LoRA's row is
    configs/lora.py:small's rank 8, all-linear)."""
    size, _ = common.split_size(arg)
    if size == "small":
        return common.over_seeds([{"optim.lr": lr, "method_args.orth_reg_weight": weight}
                                  for lr, weight in ((3e-3, 0.5), (1e-2, 0.5), (3e-3, 0.1))])
    return [{"adapter.rank": 3, "method_args.target_rank": 2},
            {"adapter.rank": 12, "method_args.target_rank": 8}]
