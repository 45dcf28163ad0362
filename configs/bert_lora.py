"""LoRA on a BERT encoder for the project's sentence-pair task (``data.kind='sentences'``).

    python -m experiments.train --config=configs/bert_lora.py --workdir=runs/bert_lora
    python -m experiments.train --config=configs/bert_lora.py:method=full --workdir=runs/bert_full
    python -m experiments.sweep --config=configs/bert_lora.py --workdir=runs/bert_methods

Arg keys: method ('lora', 'dora', 'full', ...: a registered method or full fine-tuning, with its
learning rate from ``LRS`` unless ``lr=`` is given), rank, targets, steps, lr. The task
(``lora_jax.data.sentences``): does sentence B mean the same as sentence A? Eval pairs use
(subject, object) pairs never seen in training; accuracy is per task ('paraphrase') as in the LM
runs. The model is BERT ``tiny`` (d=64, 2 layers) with a 2-way classifier on the mean-pooled
tokens (as all-MiniLM-L6-v2; on the [CLS] pooler LoRA from init reached only 0.766); the
tokenizer a WordPiece vocab of the templates' words (``data.tokenizer='template'``); the base a
fresh init (``base.source='init'``), so its accuracy is chance. Adapters train the 'all-linear'
kernels and the classifier (a module to save). ``experiments/bert_probe.py`` makes the same
comparison on the real all-MiniLM-L6-v2 weights, outside the trainer. What it reached (busy
2-core CPU, seed 0, 300 steps, under 1 min each): base 0.510, LoRA 0.969 (18,562 trainable),
DoRA 0.967, full 0.977 (141,314) (docs/vision.md).
"""

from configs import common

LRS = {"lora": 3e-3, "dora": 3e-3, "full": 1e-3}  # peak of the cosine; other methods: 3e-3


def get_config(arg: str = ""):
    size, arg = common.split_size(arg)
    a = common.parse_arg(arg, method="lora", rank=8, targets="all-linear",
                         steps=common.SMALL_STEPS if size == "small" else 300, lr=0.0)
    config = common.get_config()
    if a["method"] != "full":
        config = common.set_method(config, a["method"])
    config.method = a["method"]
    config.model.family = "bert"
    config.model.preset = "tiny"
    config.model.overrides = "head=sequence,n_labels=2,pooling=mean"
    config.data.kind = "sentences"
    config.data.tasks = ("paraphrase",)
    config.data.tokenizer = "template"
    config.data.n_train_per_task = 4096
    config.data.n_eval_per_task = 512
    config.base.source = "init"
    config.adapter.rank = a["rank"]
    config.adapter.alpha = 2.0 * a["rank"]
    config.adapter.targets = a["targets"]
    config.adapter.modules_to_save = r"classifier/(kernel|bias)"
    config.optim.lr = a["lr"] or LRS.get(a["method"], 3e-3)
    config.train.steps = a["steps"]
    config.train.batch_size = 32
    config.train.eval_every = 100
    config.train.log_every = 25
    return common.apply_size(config, size)


def get_sweep(arg: str = ""):
    """LoRA, DoRA and full fine-tuning, each at its own learning rate (``LRS``)."""
    del arg
    return [{"method": m, "optim.lr": lr} for m, lr in LRS.items()]
