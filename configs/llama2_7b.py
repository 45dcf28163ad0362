"""LoRA (or QLoRA) on Llama-2-7B, fully sharded (fsdp) over a 256-chip mesh.

    # on every host of a TPU v4-512 / v5p-512 slice (256 chips), or every node of a GPU cluster:
    python -m experiments.train --config=configs/llama2_7b.py --workdir=gs://bucket/llama2_7b \
        --config.model.hf_path=/data/Llama-2-7b-hf --config.base.source=hf \
        --config.data.tokenizer=/data/Llama-2-7b-hf/tokenizer.json \
        --config.data.kind=jsonl --config.data.train_path=train.jsonl --config.data.eval_path=eval.jsonl \
        --config.mesh.coordinator_address=auto
    python -m experiments.train --config=configs/llama2_7b.py:quant=nf4 ...     # QLoRA base

Arg keys: rank, targets, quant ('' | 'nf4' | 'int8'), steps, batch_size (global), seq_len.
bf16 weights and compute, scanned + rematerialised layers, AdamW on the adapters only, two fsdp
mesh axes (N/8 x 8). The default base is a random init (so that the config builds anywhere); pass
``model.hf_path`` and ``base.source=hf`` for the real weights. tests/test_large_configs.py lowers
and compiles its train step for 256 devices from abstract shapes; docs/scaling.md has the
per-device memory arithmetic checked against that compilation.
"""

from configs import common

PRESET = "llama2-7b"


def get_large_config(arg: str, preset: str, *, rank: int, batch_size: int):
    """The shared body of the large Llama configs."""
    a = common.parse_arg(arg, rank=rank, targets="all-linear", quant="", steps=1000,
                         batch_size=batch_size, seq_len=2048)
    if a["quant"] not in ("", "nf4", "int8"):
        raise ValueError(f"config arg quant={a['quant']!r}: use '', 'nf4' or 'int8'")
    config = common.get_config()
    config.method = "lora"
    config.model.family = "llama"
    config.model.preset = preset
    config.model.scan_layers = True
    config.model.remat = True
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.base.source = "init"  # set model.hf_path and base.source=hf for the real weights
    config.adapter.rank = a["rank"]
    config.adapter.alpha = 2.0 * a["rank"]
    config.adapter.targets = a["targets"]
    config.quant.kind = a["quant"]
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 50
    config.train.steps = a["steps"]
    config.train.batch_size = a["batch_size"]
    config.train.eval_batch_size = a["batch_size"]
    config.train.checkpoint_every = 200
    config.train.eval_every = 200
    config.train.log_every = 10
    config.data.seq_len = a["seq_len"]
    config.mesh.preset = "fsdp"  # fsdp = every device; the batch splits over it too
    # Two fsdp axes, (N/8) x 8: weights split over both; B of q/k/v and A of o, whose (32 heads,
    # 128) no single axis of 256 divides, take one axis per dimension (docs/scaling.md). Any
    # device count that 8 divides works.
    config.mesh.fsdp2 = 8
    config.mesh.init_timeout_s = 600
    return config


def get_config(arg: str = ""):
    return get_large_config(arg, PRESET, rank=16, batch_size=256)


def get_sweep(arg: str = ""):
    """Rank, and the QLoRA base."""
    del arg
    return [{"adapter.rank": 16}, {"adapter.rank": 64}, {"quant.kind": "nf4"}]
