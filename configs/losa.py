"""LoSA (Huang et al., ICLR 2025) on the default experiment: the cached task-suite GPT-2 pruned to a
target sparsity S in T steps while sparse (masked) adapters are trained, with layer-wise
sparsity from representation mutual information and ranks from reconstruction errors.

    python -m experiments.train --config=configs/losa.py --workdir=runs/losa
    python -m experiments.train --config=configs/losa.py:sparsity=0.7,pruner=sparsegpt \
        --workdir=runs/losa_s70
    # the comparison (dense / pruned without fine-tuning / pruned once + LoRA / LoSA):
    python -m experiments.sweep --config=configs/losa.py:compare --workdir=runs/losa_cmp
    # or one run each (what produced docs/losa.md's held-out-task table):
    python -m experiments.train --config=configs/losa.py:sparsity=0.7,variant=prune_lora \
        --workdir=runs/losa/prune_lora_s0.7
    # LoSA's claim: prune the base, recover on the tasks it was pretrained on (copy, reverse, sort,
    # add); Wanda / SparseGPT x S 0.5 / 0.7 x {LoSA, prune once + LoRA}, LoRA on the unpruned base,
    # 3 seeds, 400 steps each (27 runs; the table and its script: docs/losa.md):
    python -m experiments.sweep --config=configs/losa.py:claim --config.train.eval_every=400 \
        --workdir=runs/losa_claim

A leading 'compare' or 'claim' names the sweep (it goes to both functions); 'claim' fine-tunes
and evaluates on ``base.pretrain_tasks``. Arg keys: sparsity (S), pruner ('wanda' | 'sparsegpt' |
'magnitude'), iterations (T), beta, pattern ('' or '2:4'), steps, variant ('losa' | 'reference' |
'prune_lora' | 'prune_masked').
``variant='reference'``: LoSA with the reference code's choices (wzhuang-xmu/LoSA): ranks capped at
8, adapter dropout 0.1, masks from ``W != 0`` (earlier zeros stay frozen); see
``lora_jax.methods.sparse.LoSA`` for each deviation of the default. beta is not swept: the exact
LP's solution depends only on the order of the importances, which beta does not change.
``variant='prune_lora'``: prune once (T = 1, one rate for every block) then plain LoRA (its
merge is dense); ``'prune_masked'``: the same with masked adapters. "Pruned without fine-tuning"
is logged by every run as ``losa[0].eval_after_prune`` of a T = 1 run in summary.json.

Results (docs/losa.md has the tables, the commands and what they do not show). The claim, on the
pretraining tasks (3 seeds, mean accuracy, 400 steps): the dense base scores 0.575; a uniform
prune drops it to 0.313 / 0.518 (Wanda / SparseGPT, S=0.5) and 0.003 / 0.177 (S=0.7). LoSA,
whose merged model keeps the sparsity, regains it to 0.570 / 0.577 (S=0.5, inside the noise of
dense) and 0.536 ± 0.010 / 0.560 ± 0.007 (S=0.7). Pruned once + LoRA (dense merge) reaches
0.549 / 0.544 at S=0.7: better than LoSA with Wanda, worse with SparseGPT.
Held-out tasks (default experiment, one seed): LoSA at S=0.7 ends with a merged model of measured
sparsity 0.697 at 0.609 mean accuracy (dense base 0.000); pruned once + plain LoRA reaches 0.637
but merges dense.
"""

from configs import common


SWEEPS = ("compare", "claim")  # a leading sweep name is passed to both functions
SEEDS = (0, 1, 2)  # the claim's adapter seeds (init, data order, calibration rows); base.seed fixed
# Prune once (T = 1, one rate for every block), then plain rank-8 LoRA (its merge is dense); the
# sweeps' form of variant='prune_lora':
PRUNE_LORA = {"method_args.iterations": 1, "method_args.layerwise": False,
              "method_args.dynamic_rank": False, "method_args.masked": False,
              "adapter.rank": 8, "adapter.alpha": 16.0}


def get_config(arg: str = ""):
    sweep, _, rest = (arg or "").partition(",")
    sweep = sweep.strip()
    if sweep in SWEEPS:
        arg = rest
    a = common.parse_arg(arg, sparsity=0.5, pruner="wanda", iterations=5, beta=1.0, pattern="",
                         steps=400, variant="losa", rank=16, alpha=32.0)
    config = common.set_method(common.get_config(), "losa")
    if sweep == "claim":  # fine-tune and evaluate on what the base was pretrained on
        config.data.tasks = config.base.pretrain_tasks
    config.adapter.rank = a["rank"]  # r_max: A and B keep this size; rank masks select ranks
    config.adapter.alpha = float(a["alpha"])
    config.train.steps = a["steps"]
    sc = config.method_args
    sc.target = float(a["sparsity"])
    sc.pruner = a["pruner"]
    sc.iterations = int(a["iterations"])
    sc.beta = float(a["beta"])
    sc.pattern = a["pattern"]
    if a["variant"] == "reference":
        sc.rank_cap, sc.mask_from = 8, "nonzero"
        config.adapter.dropout = 0.1
    elif a["variant"] in ("prune_lora", "prune_masked"):
        sc.iterations, sc.layerwise, sc.dynamic_rank = 1, False, False
        sc.masked = a["variant"] == "prune_masked"
        config.adapter.rank, config.adapter.alpha = 8, 16.0
    elif a["variant"] != "losa":
        raise ValueError(f"variant={a['variant']!r}; use 'losa', 'reference', 'prune_lora' or "
                         "'prune_masked'")
    return config


def get_sweep(arg: str = ""):
    """'' : S × pruner × T around the defaults, and the reference's options one at a time;
    'compare': the held-out-task table of docs/losa.md; 'claim': LoSA's claim on the pretraining
    tasks (S × pruner × {LoSA, prune once + LoRA}, and LoRA on the unpruned base, × 3 seeds;
    seeds outermost so that a cut grid still has every column)."""
    sweep = (arg or "").split(",")[0].strip()
    if sweep == "compare":
        return [p for s in (0.5, 0.7) for p in ({"method_args.target": s},
                                                 {"method_args.target": s, **PRUNE_LORA})]
    if sweep == "claim":
        dense_lora = {"method_args.target": 0.0, **PRUNE_LORA}  # the control: LoRA, no pruning
        return [point for seed in SEEDS for point in
                [{"seed": seed, **dense_lora}] +
                [{"seed": seed, "method_args.pruner": p, "method_args.target": s, **variant}
                 for p in ("wanda", "sparsegpt") for s in (0.5, 0.7)
                 for variant in ({}, PRUNE_LORA)]]
    grid = [{"method_args.target": s, "method_args.pruner": p}
            for s in (0.5, 0.7) for p in ("wanda", "sparsegpt")]
    grid += [{"method_args.iterations": t} for t in (1, 3, 5)]
    grid += [{"method_args.rank_cap": 8}, {"method_args.mask_from": "nonzero"},
             {"adapter.dropout": 0.1}]
    grid += [{"method_args.pattern": "2:4"}]
    return grid
