"""LoRA vs DoRA vs PiSSA vs full fine-tuning on the default experiment, at matched steps.

    python -m experiments.sweep --config=configs/methods.py:small --workdir=runs/methods
    python -m experiments.report runs/methods

Every point runs the same number of steps on the same data and base; each method keeps its own
config's learning rate (3e-3 for the adapters, 1e-3 for full fine-tuning: configs/full_ft.py).
PiSSA is LoRA with ``method_args.init_weights='pissa'`` (A, B from the top-r SVD of W; W keeps the residual).
Results: docs/ablations.md.
"""

from configs import common, full_ft, lora


def get_config(arg: str = ""):
    return lora.get_config(arg)


def get_sweep(arg: str = ""):
    """'small': the four methods at rank 8 × the seeds ``common.SEEDS`` (12 runs); 'full': the
    adapters at ranks {8, 32}, plus full FT (7 runs).

    Every point sets the same keys (``adapter.*`` is ignored by full fine-tuning) so the report
    sees one 'method' axis rather than points with missing values.
    """
    size, _ = common.split_size(arg)
    lr_adapter = lora.get_config().optim.lr
    lr_full = full_ft.get_config().optim.lr
    ranks = (8,) if size == "small" else (8, 32)
    points = []
    for rank in ranks:
        points += [{"method": m, "method_args.init_weights": init, "adapter.rank": rank,
                    "optim.lr": lr_adapter}
                   for m, init in (("lora", "default"), ("dora", "default"), ("lora", "pissa"))]
    points.append({"method": "full", "method_args.init_weights": "default", "adapter.rank": ranks[0],
                   "optim.lr": lr_full})
    if size == "small":  # one rank: leave it out of the names
        for p in points:
            del p["adapter.rank"]
    return common.over_seeds(points, size)
