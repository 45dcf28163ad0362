"""LoRA on a ViT for the bundled 8x8 digits (``data.kind='images'``), through the trainer.

    python -m experiments.train --config=configs/vit_lora.py --workdir=runs/vit_lora
    python -m experiments.train --config=configs/vit_lora.py:method=full --workdir=runs/vit_full
    python -m experiments.sweep --config=configs/vit_lora.py --workdir=runs/vit_methods

Arg keys: method ('lora', 'dora', 'full', ...: a registered method or full fine-tuning, with
its learning rate from ``LRS`` unless ``lr=`` is given), rank, targets, steps, lr. The model is
the ViT ``digits`` preset (patch 2, d=64, 4 layers, a 10-way head); the data are the held-out
views and classes of ``lora_jax.data.images`` (``HELD_OUT``), one task id each, scored by
per-task accuracy. Adapters train the 'all-linear' kernels and the head (``head/*`` as a module
to save); ``method=full`` trains every parameter. The base is pretrained on ``plain_0to4`` (digits
0-4, 1,000 steps, about 3 min) by the same trainer, once, and cached like the default
experiment's; ``--config.base.source=init`` starts from a fresh init instead. What it reached (busy 2-core CPU, seed 0, 300 steps,
about 1 min each), mean accuracy over the four tasks: from init (0.150) LoRA 0.723, full 0.680;
from the pretrained base (0.115) LoRA 0.821, DoRA 0.846, full 0.894 (docs/vision.md).
"""

from configs import common

# Peak of the cosine (others: 3e-3). Tried here, seed 0, pretrained base (docs/vision.md): DoRA
# 3e-3 0.846 vs 1e-2 0.573 (vision.py's pick for 100 steps on one task); full 3e-3 0.894 vs 1e-3
# 0.776.
LRS = {"lora": 3e-3, "dora": 3e-3, "full": 3e-3}


def get_config(arg: str = ""):
    size, arg = common.split_size(arg)
    a = common.parse_arg(arg, method="lora", rank=8, targets="all-linear",
                         steps=common.SMALL_STEPS if size == "small" else 300, lr=0.0)
    config = common.get_config()
    if a["method"] != "full":
        config = common.set_method(config, a["method"])
    config.method = a["method"]
    config.model.family = "vit"
    config.model.preset = "digits"
    config.data.kind = "images"
    config.data.tasks = ("plain_5to9", "rot90_0to4", "shift_0to4", "invert_0to4")
    config.base.pretrain_tasks = ("plain_0to4",)
    config.base.pretrain_steps = 1000
    config.base.pretrain_batch_size = 64
    config.adapter.rank = a["rank"]
    config.adapter.alpha = 2.0 * a["rank"]
    config.adapter.targets = a["targets"]
    config.adapter.modules_to_save = r"head/(kernel|bias)"
    config.optim.lr = a["lr"] or LRS.get(a["method"], 3e-3)
    config.train.steps = a["steps"]
    config.train.batch_size = 64
    config.train.eval_every = 100
    config.train.log_every = 25
    return common.apply_size(config, size)


def get_sweep(arg: str = ""):
    """LoRA, DoRA and full fine-tuning, each at its own learning rate (``LRS``)."""
    del arg
    return [{"method": m, "optim.lr": lr} for m, lr in LRS.items()]
