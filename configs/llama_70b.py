"""LoRA (or QLoRA) on Llama-2-70B, fully sharded (fsdp) over a 256-chip mesh.

    # on every host of a TPU v5p-512 slice (256 chips, 95 GB HBM each), or every GPU node:
    python -m experiments.train --config=configs/llama_70b.py --workdir=gs://bucket/llama_70b \
        --config.model.hf_path=/data/Llama-2-70b-hf --config.base.source=hf \
        --config.data.tokenizer=/data/Llama-2-70b-hf/tokenizer.json \
        --config.data.kind=jsonl --config.data.train_path=train.jsonl --config.data.eval_path=eval.jsonl \
        --config.mesh.coordinator_address=auto
    python -m experiments.train --config=configs/llama_70b.py:quant=nf4 ...     # QLoRA base

Arg keys: rank, targets, quant ('' | 'nf4' | 'int8'), steps, batch_size (global), seq_len.
Same settings as configs/llama2_7b.py (bf16, scan + remat, fsdp); grouped-query attention with 8
KV heads. tests/test_large_configs.py lowers and compiles its train step for 256 devices from
abstract shapes; docs/scaling.md has the per-device memory arithmetic.
"""

from configs.llama2_7b import get_large_config

PRESET = "llama2-70b"


def get_config(arg: str = ""):
    return get_large_config(arg, PRESET, rank=16, batch_size=256)


def get_sweep(arg: str = ""):
    """Rank, and the QLoRA base."""
    del arg
    return [{"adapter.rank": 16}, {"adapter.rank": 64}, {"quant.kind": "nf4"}]
